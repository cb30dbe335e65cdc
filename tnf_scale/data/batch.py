"""The micro-batch the step consumes: padded tokens, MLM labels, and the rare occurrences it holds."""

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

    @property
    def occ_order_key(self) -> torch.Tensor:
        return self.order_key[self.occ_sample]

    @property
    def read_spans(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rare id, sample, start, end) of the occurrences that read a note."""
        reads = self.occ_reads
        return self.occ_rare[reads], self.occ_sample[reads], self.occ_start[reads], self.occ_end[reads]

    def padded(self, rows: int) -> Batch:
        """The micro-batch grown to `rows` rows by copies of its first row that predict nothing and hold no occurrence,
        for schedules that need equal micro-batches (DeepSpeed's pipeline)."""
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

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `fn` applied to every tensor (a device copy, page-locking)."""
        return Batch(*(fn(getattr(self, f)) for f in self.__dataclass_fields__))

    def pin_memory(self) -> Batch:
        """The batch page-locked for the accelerator DeepSpeed runs on, so that copies to it need not block."""
        return self.map(get_accelerator().pin_memory)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))
