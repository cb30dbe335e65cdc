"""The micro-batch the step consumes: padded tokens, MLM labels, and the rare occurrences it holds.

Everything whose size depends on the data (which occurrences read a note, which positions are predicted, which are
real) arrives as index tensors the collator computed on the host: on a GPU the step then never has to read a mask
back from the device to learn how much work there is (a boolean mask index or a `.sum()` stalls the queue).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from deepspeed.accelerator import get_accelerator

IGNORE_INDEX = -100  # label of a token not selected for prediction (PyTorch's and Hugging Face's ignore index)


@dataclass
class Batch:
    """A micro-batch: padded tokens, MLM labels, and the rare occurrences it holds."""

    input_ids: torch.Tensor  # (b, L) int64, masked
    attention_mask: torch.Tensor  # (b, L)
    labels: torch.Tensor  # (b, L), IGNORE_INDEX where not selected for prediction
    lengths: torch.Tensor  # (b,) real (non-padding) length
    order_key: torch.Tensor  # (b,)
    occ_sample: torch.Tensor  # (n,) which row of the micro-batch
    occ_rare: torch.Tensor  # (n,) rare id
    occ_start: torch.Tensor  # (n,) inclusive token span
    occ_end: torch.Tensor
    occ_reads: torch.Tensor  # (n,) bool: the occurrence reads its note (no token of its span is predicted)
    in_rare_span: torch.Tensor  # (b, L) bool: the position lies in a rare occurrence's span
    sample_uniform: torch.Tensor  # (b, L) float: ELECTRA's generator samples a replacement with it (inverse CDF)
    read_index: torch.Tensor  # (r,) the occurrences that read their note, ascending
    predicted_index: torch.Tensor  # (p,) flat (row-major) positions of the tokens to predict
    real_index: torch.Tensor  # (t,) flat positions of the real (non-padding) tokens
    read_token_index: torch.Tensor  # (s,) flat positions of every token of the spans that read a note
    read_token_occ: torch.Tensor  # (s,) which reading occurrence (a place in read_index) each of them belongs to

    @property
    def occ_order_key(self) -> torch.Tensor:
        return self.order_key[self.occ_sample]

    @property
    def read_spans(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rare id, sample, start, end) of the occurrences that read a note."""
        index = self.read_index
        return self.occ_rare[index], self.occ_sample[index], self.occ_start[index], self.occ_end[index]

    @property
    def num_reads(self) -> int:
        return len(self.read_index)

    @property
    def num_predicted(self) -> int:
        return len(self.predicted_index)

    @property
    def num_tokens(self) -> int:
        return len(self.real_index)

    @property
    def has_padding(self) -> bool:
        """Whether any position is padding (from the shapes the collator fixed: nothing is read from the device)."""
        return self.num_tokens < self.input_ids.numel()

    @property
    def model_attention_mask(self) -> torch.Tensor | None:
        """The attention mask to hand the model: None for a micro-batch without padding, which means the same and spares
        transformers' check whether the mask holds padding (a read from the device per forward)."""
        return self.attention_mask if self.has_padding else None

    def padded(self, rows: int) -> Batch:
        """The micro-batch grown to `rows` rows by copies of its first row that predict nothing and hold no occurrence,
        for schedules that need equal micro-batches (DeepSpeed's pipeline); the indices keep naming the real rows."""
        extra = rows - len(self.input_ids)
        if extra <= 0:
            return self

        def grow(t: torch.Tensor, fill=None) -> torch.Tensor:
            copies = t[:1].expand(extra, *t.shape[1:]).clone()
            return torch.cat([t, copies if fill is None else copies.fill_(fill)])

        return dataclasses.replace(
            self,
            input_ids=grow(self.input_ids),
            attention_mask=grow(self.attention_mask),
            labels=grow(self.labels, IGNORE_INDEX),
            lengths=grow(self.lengths),
            order_key=grow(self.order_key),
            in_rare_span=grow(self.in_rare_span, False),
            sample_uniform=grow(self.sample_uniform),
        )

    def emptied(self) -> Batch:
        """A micro-batch of this one's shape with nothing in it: no position predicted or scored, no occurrence, no
        read. A replica whose share of the held-out set is shorter runs it, so that every replica runs as many
        forwards (ZeRO-3 gathers each layer's parameters in a collective every forward)."""
        none = self.predicted_index[:0]
        return dataclasses.replace(
            self,
            labels=torch.full_like(self.labels, IGNORE_INDEX),
            occ_sample=self.occ_sample[:0],
            occ_rare=self.occ_rare[:0],
            occ_start=self.occ_start[:0],
            occ_end=self.occ_end[:0],
            occ_reads=self.occ_reads[:0],
            in_rare_span=torch.zeros_like(self.in_rare_span),
            read_index=self.read_index[:0],
            predicted_index=none,
            real_index=self.real_index[:0],
            read_token_index=self.read_token_index[:0],
            read_token_occ=self.read_token_occ[:0],
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `fn` applied to every tensor (a device copy, page-locking)."""
        return Batch(*(fn(getattr(self, f)) for f in self.__dataclass_fields__))

    def pin_memory(self) -> Batch:
        """The batch page-locked for the accelerator DeepSpeed runs on, so that copies to it need not block."""
        return self.map(get_accelerator().pin_memory)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))
