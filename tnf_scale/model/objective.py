"""The objective seam: what a pre-training objective tells the trainer, the pipeline path and evaluation.

An objective is the module DeepSpeed wraps. From a micro-batch it computes the loss of every token it asks
about (`predicted`), summed by the trainer; it names the network TNF enters (`note_network`: notes mixed at
its embedding LayerNorm input, taken from its encoder output, the one seam of every path); and it turns
held-out loss sums, without and with notes, into the metrics a run logs. The engine, the pipeline path and
evaluation never ask which objective they run. BERT's masked LM is the objective today.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM

from tnf_scale.data.sampler import IGNORE_INDEX, Batch


@dataclass
class LossSums:
    """Summed cross-entropy over predicted tokens and their count, split into tokens inside a rare span and the rest."""

    ce_rare: float = 0.0
    ce_other: float = 0.0
    tokens_rare: int = 0
    tokens_other: int = 0

    def add(self, token_ce: torch.Tensor, in_rare: torch.Tensor) -> None:
        """Add the losses of predicted tokens; `in_rare` (bool, same length) marks those inside a rare span."""
        token_ce = token_ce.detach().float()
        self.ce_rare += float(token_ce[in_rare].sum())
        self.ce_other += float(token_ce[~in_rare].sum())
        self.tokens_rare += int(in_rare.sum())
        self.tokens_other += int((~in_rare).sum())

    @property
    def ce(self) -> float:
        return self.ce_rare + self.ce_other

    def as_list(self) -> list[float]:
        return [self.ce_rare, self.ce_other, self.tokens_rare, self.tokens_other]

    def losses(self, name: str) -> dict[str, float]:
        """Mean loss over all predicted tokens as `name`, over rare-span and other tokens as `name`_rare / _other
        (a part without tokens is left out)."""
        parts = {name: (self.ce, self.tokens_rare + self.tokens_other),
                 f"{name}_rare": (self.ce_rare, self.tokens_rare), f"{name}_other": (self.ce_other, self.tokens_other)}
        return {key: ce / tokens for key, (ce, tokens) in parts.items() if tokens}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each (logits row, label) pair, in fp32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


class Objective(nn.Module, metaclass=ABCMeta):
    """A pre-training objective behind the seam (see the module docstring)."""

    @abstractmethod
    def note_network(self) -> nn.Module:
        """The Hugging Face base model whose `embeddings.LayerNorm` reads notes and whose `encoder` output is noted."""

    @abstractmethod
    def predicted(self, batch: Batch) -> torch.Tensor:
        """(batch, seq_len) bool: the tokens whose losses `forward` returns (row-major order)."""

    @abstractmethod
    def eval_metrics(self, plain: LossSums, with_notes: LossSums | None) -> dict[str, float]:
        """The metrics of one evaluation from its summed losses without notes and (TNF runs) with notes."""


class MaskedLMObjective(Objective):
    """BERT's masked LM: BertForMaskedLM's loss of every predicted token, with the head run on those tokens only.

    The wrapped model is used as it is; its weights sit under the `mlm.` prefix. Notes are read and taken by
    `mlm.bert`; the held-out loss is reported as `eval_loss_no_notes` / `eval_loss_notes`, each split into
    tokens inside rare spans (`_rare`) and the rest (`_other`).
    """

    def __init__(self, mlm: BertForMaskedLM):
        super().__init__()
        self.mlm = mlm

    def note_network(self) -> nn.Module:
        return self.mlm.bert

    def predicted(self, batch: Batch) -> torch.Tensor:
        return batch.labels != IGNORE_INDEX

    def eval_metrics(self, plain: LossSums, with_notes: LossSums | None) -> dict[str, float]:
        result = {**plain.losses("eval_loss_no_notes"), "eval_tokens_rare": int(plain.tokens_rare), "eval_tokens_other": int(plain.tokens_other)}
        if with_notes is not None:
            result.update(with_notes.losses("eval_loss_notes"))
        return result

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        predicted = labels != IGNORE_INDEX
        return token_cross_entropy(self.mlm.cls(hidden[predicted]), labels[predicted])
