"""Hugging Face BERT, unchanged, with TNF entering through two hooks.

The read-mix is a forward pre-hook on `bert.embeddings.LayerNorm` (its input is the summed
word + position + type embedding of docs/design.md, "Read"); note taking is a forward hook on
`bert.encoder` that pools the last layer's output around each occurrence ("Write").
With no reads or captures set, both hooks do nothing and the model is plain BERT.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from tnf_scale.config import RunConfig
from tnf_scale.notes.note_math import mix_notes, pool_windows


def bert_config(cfg: RunConfig, vocab_size: int, pad_token_id: int = 0) -> BertConfig:
    """The BertConfig of a run: model shape from the preset, vocabulary from the tokenizer (its size and [PAD] id)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=2,
        pad_token_id=pad_token_id,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )


def build_bert(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> BertForMaskedLM:
    """A freshly initialised BertForMaskedLM; the same seed gives the same weights."""
    torch.manual_seed(cfg.seed)
    return BertForMaskedLM(bert_config(cfg, len(tokenizer), tokenizer.pad_token_id))


class NoteMixer:
    """Forward pre-hook on an embedding LayerNorm: mixes the notes set for the next forward into its input."""

    def __init__(self, layer_norm: nn.Module, lam: float, rows_trainable: bool = False):
        self.lam, self.rows_trainable = lam, rows_trainable
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
        return (mix_notes(args[0], token_index, token_occ, rows, self.lam, self.rows_trainable),)


class TnfHooks:
    """TNF on whole encoder networks (the data-parallel path): set reads and captures before a forward.

    `readers` and `writer` are the Hugging Face base models an objective names (`Objective.note_readers`,
    `note_writer`), or a fine-tuned classifier's `base_model` for both: notes are mixed at each reader's
    `embeddings.LayerNorm` input and taken from the writer's `encoder` output.
    """

    def __init__(
        self, readers: list[nn.Module], writer: nn.Module, lam: float, window: int, rows_trainable: bool = False
    ):
        self.window = window
        self.mixers = [NoteMixer(network.embeddings.LayerNorm, lam, rows_trainable) for network in readers]
        self._capture: tuple[torch.Tensor, ...] | None = None
        self.pooled: torch.Tensor | None = None
        writer.encoder.register_forward_hook(self._take_notes)

    def set_reads(self, token_index: torch.Tensor, token_occ: torch.Tensor, rows: torch.Tensor) -> None:
        """Mix `rows` (one note per occurrence) into the next forward of every reader, at the flat token positions
        `token_index` of the occurrences `token_occ` (`spans.expand_spans`)."""
        for mixer in self.mixers:
            mixer.set_reads(token_index, token_occ, rows)

    def set_capture(self, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, lengths: torch.Tensor) -> None:
        """Pool the context window of every occurrence in the next forward into `self.pooled`."""
        self._capture = (sample, start, end, lengths)

    def clear(self) -> None:
        for mixer in self.mixers:
            mixer.clear()
        self._capture = self.pooled = None

    def _take_notes(self, module, args, output):
        if self._capture is not None:
            device = output[0].device
            sample, start, end, lengths = (t.to(device) for t in self._capture)
            self.pooled = pool_windows(output[0], sample, start, end, lengths, self.window)
