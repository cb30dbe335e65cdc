"""Variable-length all-to-all over the note group (the ranks sharing one dictionary): counts first, then the payload.

Every rank calls every exchange, with or without rows to send, so no rank blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import deepspeed
import torch


@dataclass
class ExchangeGroup:
    """The ranks that share one note dictionary: the note group (`group=None`: the world, as Topology says)."""

    rank: int
    size: int
    group: object = None

    def exchange_counts(self, send_counts: list[int], device: torch.device) -> list[int]:
        """Each rank tells each other rank how many rows follow; returns how many this rank receives from each. The
        counts cross on `device` (NCCL's) and come back to the host: all_to_all takes its split sizes there."""
        if self.size == 1:
            return list(send_counts)
        send = torch.tensor(send_counts, dtype=torch.int64, device=device)
        recv = torch.empty_like(send)
        deepspeed.comm.all_to_all_single(recv, send, group=self.group)
        return recv.tolist()

    def exchange_rows(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """Send rows[i] blocks to their ranks (send is grouped by destination); returns the received rows by source."""
        if self.size == 1:
            return send.clone()
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        deepspeed.comm.all_to_all_single(
            recv, send.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts, group=self.group
        )
        return recv

    def route(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Counts, then payload: (received rows grouped by source rank, counts received from each rank)."""
        recv_counts = self.exchange_counts(send_counts, send.device)
        return self.exchange_rows(send, send_counts, recv_counts), recv_counts
