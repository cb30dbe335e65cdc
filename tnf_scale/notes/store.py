"""A note dictionary held whole by one rank."""
from __future__ import annotations

import torch

from tnf_scale.notes.note_math import application_order, ema_closed_form, initial_notes


class LocalNoteStore:
    """All R note rows on one rank, with the read and ordered-write operations of TNF_SPEC 3-4."""

    def __init__(self, num_rare: int, dim: int, seed: int, init_std: float, gamma: float, device: torch.device | str = "cpu"):
        self.gamma = gamma
        self.ids = torch.arange(num_rare, dtype=torch.int64)
        self.table = initial_notes(self.ids, dim, seed, init_std).to(device)
        self.noted = torch.zeros(num_rare, dtype=torch.bool, device=device)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """Note rows for `ids` (duplicates allowed), as they stand now."""
        return self.table.index_select(0, ids.to(self.device))

    def write(self, ids: torch.Tensor, order_key: torch.Tensor, start: torch.Tensor, notes: torch.Tensor) -> None:
        """Apply every occurrence's note in (id, order key, start) order with the EMA of TNF_SPEC 4."""
        if len(ids) == 0:
            return
        ids, notes = ids.to(self.device), notes.to(self.device, torch.float32)
        perm = application_order(ids, order_key.to(self.device), start.to(self.device))
        unique, decay, contribution = ema_closed_form(ids[perm], notes[perm], self.gamma)
        self.table[unique] = self.table[unique] * decay.unsqueeze(1) + contribution
        self.noted[unique] = True

    def distinct_noted(self) -> int:
        return int(self.noted.sum())

    def state(self) -> dict[str, torch.Tensor]:
        """Rows with their ids, for checkpoints and notes.safetensors."""
        return {"ids": self.ids.clone(), "vectors": self.table.float().cpu().clone(), "noted": self.noted.cpu().clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        order = torch.argsort(state["ids"])
        if not torch.equal(state["ids"][order], self.ids):
            raise ValueError(f"note rows do not cover rare ids 0..{len(self.ids) - 1} exactly once")
        self.table.copy_(state["vectors"][order].to(self.device))
        self.noted.copy_(state["noted"][order].to(self.device))
