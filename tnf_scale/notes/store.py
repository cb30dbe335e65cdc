"""The note dictionary, partitioned over the note group's ranks, the whole world (docs/design.md, "The sharded note
dictionary").

Rare id r lives on rank mix64(r) mod W; each rank holds only its rows. Reads send the
de-duplicated ids a rank needs to their owners and get the rows back; writes send every
raw occurrence (id, order key, start, note) to its owner, which applies them in
(id, order key, start) order. With W = 1 the exchange is the identity and no collective runs.
"""

from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.note_math import application_order, ema_closed_form, initial_notes, owner_of

_META = 3  # id, order key, start: int64 columns that travel with each written note


class NoteStore:
    """This rank's share of the note rows, with collective read and ordered write."""

    def __init__(
        self,
        num_rare: int,
        dim: int,
        seed: int,
        init_std: float,
        gamma: float,
        exchange: ExchangeGroup | None = None,
        device: torch.device | str | None = None,
    ):
        """`device`: where the rows live and the exchange runs (default: this rank's accelerator device, which NCCL
        needs; the CPU under gloo)."""
        device = device if device is not None else torch.device(get_accelerator().current_device_name())
        self.num_rare, self.dim, self.gamma = num_rare, dim, gamma
        self.exchange = exchange or ExchangeGroup(rank=0, size=1)
        every = torch.arange(num_rare, dtype=torch.int64)
        self.ids = every[owner_of(every, self.exchange.size) == self.exchange.rank]
        self.slot_of = torch.full((num_rare,), -1, dtype=torch.int64)
        self.slot_of[self.ids] = torch.arange(len(self.ids))
        self.slot_of = self.slot_of.to(device)
        self.table = initial_notes(self.ids.to(device), dim, seed, init_std)  # on the device: no host round trip
        self.noted = torch.zeros(len(self.ids), dtype=torch.bool, device=device)
        self.traffic = self._zero_traffic()

    @property
    def device(self) -> torch.device:
        return self.table.device

    @staticmethod
    def _zero_traffic() -> dict[str, int]:
        return dict.fromkeys(
            (
                "ids_requested",
                "ids_unique",
                "read_bytes_sent",
                "read_bytes_received",
                "write_bytes_sent",
                "write_bytes_received",
            ),
            0,
        )

    def take_traffic(self) -> dict[str, int]:
        """Counters since the last call (this rank only): ids asked for, and payload bytes to and from other ranks."""
        traffic, self.traffic = self.traffic, self._zero_traffic()
        return traffic

    def _off_rank_bytes(self, counts: list[int], row_bytes: int) -> int:
        return (sum(counts) - counts[self.exchange.rank]) * row_bytes

    def _by_owner(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(permutation grouping `ids` by owner rank, how many go to each rank). Alone, a rank owns every id and
        nothing is read back from the device; otherwise the counts are all_to_all's split sizes, wanted on the host."""
        if self.exchange.size == 1:
            return torch.arange(len(ids), device=ids.device), [len(ids)]
        owners = owner_of(ids, self.exchange.size)
        return torch.argsort(owners, stable=True), torch.bincount(owners, minlength=self.exchange.size).tolist()

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Note rows for `ids` (duplicates allowed) as they stand now. Collective: every rank calls it."""
        ids = ids.to(self.device)
        unique, inverse = torch.unique(ids, return_inverse=True)
        order, send_counts = self._by_owner(unique)
        asked, recv_counts = self.exchange.route(unique[order], send_counts)
        answers = self.exchange.exchange_rows(self.table[self.slot_of[asked]], recv_counts, send_counts)
        rows = torch.empty(len(unique), self.dim, device=self.device)
        rows[order] = answers
        row_bytes = self.dim * self.table.element_size()
        t = self.traffic
        t["ids_requested"] += len(ids)
        t["ids_unique"] += len(unique)
        t["read_bytes_sent"] += self._off_rank_bytes(send_counts, 8) + self._off_rank_bytes(recv_counts, row_bytes)
        t["read_bytes_received"] += self._off_rank_bytes(recv_counts, 8) + self._off_rank_bytes(send_counts, row_bytes)
        return rows[inverse]

    def write(self, ids: torch.Tensor, order_key: torch.Tensor, start: torch.Tensor, notes: torch.Tensor) -> None:
        """Send each note to the owner of its id, which applies the EMA in (id, order key, start) order. Collective."""
        ids = ids.to(self.device)
        order, send_counts = self._by_owner(ids)
        meta = torch.stack([ids, order_key.to(self.device), start.to(self.device)], dim=1)[order]
        # One payload per occurrence: the int64 metadata and the float32 note, bit-cast to int32 side by side.
        payload = torch.cat(
            [meta.view(torch.int32), notes.to(self.device, torch.float32)[order].contiguous().view(torch.int32)], dim=1
        )
        received, recv_counts = self.exchange.route(payload, send_counts)
        meta = received[:, : 2 * _META].contiguous().view(torch.int64)
        self._apply(meta[:, 0], meta[:, 1], meta[:, 2], received[:, 2 * _META :].contiguous().view(torch.float32))
        row_bytes = payload.shape[1] * payload.element_size()
        self.traffic["write_bytes_sent"] += self._off_rank_bytes(send_counts, row_bytes)
        self.traffic["write_bytes_received"] += self._off_rank_bytes(recv_counts, row_bytes)

    def _apply(self, ids: torch.Tensor, order_key: torch.Tensor, start: torch.Tensor, notes: torch.Tensor) -> None:
        if len(ids) == 0:
            return
        perm = application_order(ids, order_key, start)
        unique, decay, contribution = ema_closed_form(ids[perm], notes[perm], self.gamma)
        slots = self.slot_of[unique]
        self.table[slots] = self.table[slots] * decay.unsqueeze(1) + contribution
        self.noted[slots] = True

    def distinct_noted(self) -> int:
        """Words of this rank's share that have been written at least once."""
        return int(self.noted.sum())

    sharded_state = True  # a checkpoint hands `load_state_dict` every rank's rows: it keeps its own

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's rows with their ids, for checkpoints."""
        return {"ids": self.ids.clone(), "vectors": self.table.float().cpu().clone(), "noted": self.noted.cpu().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's rows out of rows saved under any partition (re-partitioning when W changed)."""
        mine = owner_of(state["ids"], self.exchange.size) == self.exchange.rank
        ids = state["ids"][mine]
        order = torch.argsort(ids)
        if not torch.equal(ids[order], self.ids):
            raise ValueError(
                f"the saved note rows do not cover rank {self.exchange.rank}'s {len(self.ids)} rare ids exactly once"
            )
        self.table.copy_(state["vectors"][mine][order].to(self.device))
        self.noted.copy_(state["noted"][mine][order].to(self.device))
