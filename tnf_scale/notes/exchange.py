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

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """Each rank tells each other rank how many rows follow; returns how many this rank receives from each."""
        if self.size == 1:
            return send_counts.clone()
        recv_counts = torch.empty_like(send_counts)
        deepspeed.comm.all_to_all_single(recv_counts, send_counts, group=self.group)
        return recv_counts

    def exchange_rows(self, send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """Send rows[i] blocks to their ranks (send is grouped by destination); returns the received rows by source."""
        if self.size == 1:
            return send.clone()
        recv = send.new_empty((int(recv_counts.sum()), *send.shape[1:]))
        deepspeed.comm.all_to_all_single(
            recv,
            send.contiguous(),
            output_split_sizes=recv_counts.tolist(),
            input_split_sizes=send_counts.tolist(),
            group=self.group,
        )
        return recv

    def route(self, send: torch.Tensor, send_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts, then payload: (received rows grouped by source rank, counts received from each rank)."""
        recv_counts = self.exchange_counts(send_counts)
        return self.exchange_rows(send, send_counts, recv_counts), recv_counts
