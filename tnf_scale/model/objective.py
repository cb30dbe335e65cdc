"""The objective seam: what a pre-training objective tells the trainer, the pipeline path and evaluation.

An objective is the module DeepSpeed wraps. From a micro-batch it computes one or more loss terms, each the loss
of every position the term averages over (`term_index`); the training loss is the sum of the terms' means over
the global batch, weighted by `term_weights` (a weight of 0: the term is only reported). It names the networks TNF
enters (`note_readers` mix notes at their embedding LayerNorm input; `note_writer`'s encoder output is noted: the
one seam of every path), and turns held-out loss sums, without and with notes, into the metrics a run logs. The
engine, the pipeline path and evaluation never ask which objective they run: BERT's masked LM here, ELECTRA's
replaced-token detection in `electra.py`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM

from tnf_scale.data.batch import Batch


@dataclass
class LossSums:
    """Summed cross-entropy over predicted tokens and their count, split into tokens inside a rare span and the rest."""

    ce_rare: float = 0.0
    ce_other: float = 0.0
    tokens_rare: int = 0
    tokens_other: int = 0

    @classmethod
    def from_parts(cls, parts: torch.Tensor) -> LossSums:
        """The sums from `loss_parts` (or a sum of them): the one read back from the device."""
        ce_rare, ce_other, tokens_rare, tokens_other = parts.tolist()
        return cls(ce_rare, ce_other, int(tokens_rare), int(tokens_other))

    @property
    def ce(self) -> float:
        return self.ce_rare + self.ce_other

    def as_list(self) -> list[float]:
        return [self.ce_rare, self.ce_other, self.tokens_rare, self.tokens_other]

    def losses(self, name: str) -> dict[str, float]:
        """Mean loss over all predicted tokens as `name`, over rare-span and other tokens as `name`_rare / _other
        (a part without tokens is left out)."""
        parts = {
            name: (self.ce, self.tokens_rare + self.tokens_other),
            f"{name}_rare": (self.ce_rare, self.tokens_rare),
            f"{name}_other": (self.ce_other, self.tokens_other),
        }
        return {key: ce / tokens for key, (ce, tokens) in parts.items() if tokens}


def loss_parts(token_ce: torch.Tensor, in_rare: torch.Tensor) -> torch.Tensor:
    """(ce_rare, ce_other, tokens_rare, tokens_other) of predicted tokens' losses, `in_rare` (bool, same length)
    marking those inside a rare span, as one float64 tensor on their device: micro-batches add up there and are read
    back once (`LossSums.from_parts`), where a boolean mask or a `float()` per micro-batch would make the host wait."""
    token_ce = token_ce.detach().float()
    rare = in_rare.to(token_ce.dtype)
    return torch.stack([(token_ce * rare).sum(), (token_ce * (1 - rare)).sum(), rare.sum(), (1 - rare).sum()]).double()


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each (logits row, label) pair, in fp32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


class Objective(nn.Module, metaclass=ABCMeta):
    """A pre-training objective behind the seam (see the module docstring)."""

    term_weights: tuple[float, ...]  # one per loss term `forward` returns
    model_config: object  # the Hugging Face config of the network that is kept (exported as the run's model)
    generator_config: object = None  # ELECTRA: the generator's, exported beside it

    @abstractmethod
    def note_readers(self) -> list[nn.Module]:
        """The Hugging Face base models whose `embeddings.LayerNorm` input notes are mixed into."""

    @abstractmethod
    def note_writer(self) -> nn.Module:
        """The Hugging Face base model whose `encoder` output is noted."""

    @abstractmethod
    def term_index(self, batch: Batch) -> list[torch.Tensor]:
        """Per loss term, the flat (row-major) positions whose losses `forward` returns, in that order; computed by
        the collator, so their number is known on the host."""

    @abstractmethod
    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The keyword arguments of `forward` for a micro-batch."""

    def step_metrics(self, term_means: list[float]) -> dict[str, float]:
        """Metrics of one training step beyond its loss, from each term's mean over the global batch."""
        return {}

    @abstractmethod
    def eval_metrics(self, plain: list[LossSums], with_notes: list[LossSums] | None) -> dict[str, float]:
        """The metrics of one evaluation from each term's summed losses without notes and (TNF runs) with notes."""


def eval_loss_metrics(plain: LossSums, with_notes: LossSums | None) -> dict[str, float]:
    """The held-out loss every report reads: `eval_loss_no_notes` (the model as exported) and `eval_loss_notes` (as
    trained, notes read leak-free), each split into rare-span (`_rare`) and other (`_other`) positions."""
    result = {
        **plain.losses("eval_loss_no_notes"),
        "eval_tokens_rare": int(plain.tokens_rare),
        "eval_tokens_other": int(plain.tokens_other),
    }
    if with_notes is not None:
        result.update(with_notes.losses("eval_loss_notes"))
    return result


class MaskedLMObjective(Objective):
    """BERT's masked LM: BertForMaskedLM's loss of every predicted token, with the head run on those tokens only.

    The wrapped model is used as it is; its weights sit under the `mlm.` prefix. Notes are read and taken by
    `mlm.bert`; the held-out loss is reported as `eval_loss_no_notes` / `eval_loss_notes`, each split into
    tokens inside rare spans (`_rare`) and the rest (`_other`).
    """

    term_weights = (1.0,)

    def __init__(self, mlm: BertForMaskedLM):
        super().__init__()
        self.mlm, self.model_config = mlm, mlm.config

    def note_readers(self) -> list[nn.Module]:
        return [self.mlm.bert]

    def note_writer(self) -> nn.Module:
        return self.mlm.bert

    def term_index(self, batch: Batch) -> list[torch.Tensor]:
        return [batch.predicted_index]

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {
            "input_ids": batch.input_ids,
            "attention_mask": batch.model_attention_mask,
            "labels": batch.labels,
            "predicted_index": batch.predicted_index,
        }

    def eval_metrics(self, plain: list[LossSums], with_notes: list[LossSums] | None) -> dict[str, float]:
        return eval_loss_metrics(plain[0], with_notes[0] if with_notes else None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        predicted_index: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        predicted = hidden.flatten(0, 1)[predicted_index]
        return (token_cross_entropy(self.mlm.cls(predicted), labels.flatten()[predicted_index]),)
