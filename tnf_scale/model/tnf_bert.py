"""Hugging Face BERT, unchanged, with TNF entering through two hooks.

The read-mix is a forward pre-hook on `bert.embeddings.LayerNorm` (its input is the summed
word + position + type embedding of TNF_SPEC 3); note taking is a forward hook on
`bert.encoder` that pools the last layer's output around each occurrence (TNF_SPEC 4).
With no reads or captures set, both hooks do nothing and the model is plain BERT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from tnf_scale.config import RunConfig
from tnf_scale.notes.note_math import mix_notes, pool_windows
from tnf_scale.spans import expand_spans


def bert_config(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> BertConfig:
    """The BertConfig of a run: model shape from the preset, vocabulary from the tokenizer."""
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_seq_len, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
    )


def build_bert(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> BertForMaskedLM:
    """A freshly initialised BertForMaskedLM; the same seed gives the same weights."""
    torch.manual_seed(cfg.seed)
    return BertForMaskedLM(bert_config(cfg, tokenizer))


class MaskedLMObjective(nn.Module):
    """BertForMaskedLM's MLM loss of every predicted token (row-major order), with the head run on those tokens only.

    The wrapped model is used as it is; its weights sit under the `mlm.` prefix.
    """

    def __init__(self, mlm: BertForMaskedLM):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        predicted = labels != -100
        logits = self.mlm.cls(hidden[predicted])
        return F.cross_entropy(logits.float(), labels[predicted], reduction="none")


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


class NoteMixer:
    """Forward pre-hook on an embedding LayerNorm: mixes the notes set for the next forward into its input."""

    def __init__(self, layer_norm: nn.Module, lam: float):
        self.lam = lam
        self._reads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        layer_norm.register_forward_pre_hook(self._mix)

    def set_reads(self, token_index: torch.Tensor, token_occ: torch.Tensor, rows: torch.Tensor) -> None:
        """Mix rows[token_occ[i]] into flat position token_index[i] (sample * seq_len + position) next forward."""
        self._reads = (token_index, token_occ, rows)

    def clear(self) -> None:
        self._reads = None

    def _mix(self, module, args):
        if self._reads is None:
            return None
        device = args[0].device
        token_index, token_occ, rows = (t.to(device) for t in self._reads)
        return (mix_notes(args[0], token_index, token_occ, rows, self.lam),)


class TnfHooks:
    """TNF on a whole BertForMaskedLM (the data-parallel path): set reads and captures before a forward."""

    def __init__(self, model: BertForMaskedLM, lam: float, window: int):
        self.window = window
        self.mixer = NoteMixer(model.bert.embeddings.LayerNorm, lam)
        self._capture: tuple[torch.Tensor, ...] | None = None
        self.pooled: torch.Tensor | None = None
        model.bert.encoder.register_forward_hook(self._take_notes)

    def set_reads(self, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, rows: torch.Tensor, seq_len: int) -> None:
        """Mix `rows` (one note per occurrence) into the spans of the next forward."""
        self.mixer.set_reads(*expand_spans(sample, start, end, seq_len), rows)

    def set_capture(self, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, lengths: torch.Tensor) -> None:
        """Pool the context window of every occurrence in the next forward into `self.pooled`."""
        self._capture = (sample, start, end, lengths)

    def clear(self) -> None:
        self.mixer.clear()
        self._capture = self.pooled = None

    def _take_notes(self, module, args, output):
        if self._capture is not None:
            device = output[0].device
            sample, start, end, lengths = (t.to(device) for t in self._capture)
            self.pooled = pool_windows(output[0], sample, start, end, lengths, self.window)
