"""One-process checks of the note store on this node's device: the same occurrences written twice give the same rows
bit for bit, and the device's rows against the CPU store's. Usage: python -m tnf_scale.node_check.device_notes OUT.md

`occurrences` is also what the sharded-store check feeds every rank (tests/workers/store_worker.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.notes.store import NoteStore

NUM_RARE, DIM, SAMPLES_PER_STEP, STEPS = 500, 16, 32, 6


def occurrences(step: int) -> dict[str, torch.Tensor]:
    """The occurrences of one global batch: the same on every rank, device and world size."""
    g = torch.Generator().manual_seed(1000 + step)
    n = 200
    sample = torch.sort(torch.randint(SAMPLES_PER_STEP, (n,), generator=g)).values
    return {
        "ids": torch.randint(0, 60, (n,), generator=g) ** 2 % NUM_RARE,  # skewed: many repeats of some ids
        "order_key": step * SAMPLES_PER_STEP + sample,
        "sample": sample,
        "start": torch.randint(0, 100, (n,), generator=g),
        "notes": torch.randn(n, DIM, generator=g),
    }


def fed_store(device: torch.device) -> NoteStore:
    """A whole store on `device`, fed every step's occurrences."""
    store = NoteStore(NUM_RARE, DIM, seed=9, init_std=0.02, gamma=0.1, device=device)
    for step in range(STEPS):
        occ = occurrences(step)
        store.read(occ["ids"])
        store.write(occ["ids"], occ["order_key"], occ["start"], occ["notes"])
    return store


def main(out: Path) -> int:
    device = torch.device(get_accelerator().current_device_name())
    first, second, cpu = fed_store(device), fed_store(device), fed_store(torch.device("cpu"))
    repeatable = torch.equal(first.table, second.table) and torch.equal(first.noted, second.noted)
    gap = (first.table.cpu() - cpu.table).abs().max().item()
    lines = [
        f"- the same notes written twice on {device}: {'equal bit for bit' if repeatable else 'DIFFER'}",
        f"- {device} against the CPU store: largest difference {gap:.3g} "
        f"({'bit for bit' if gap == 0 else 'float rounding of the EMA'}; noted rows equal: "
        f"{torch.equal(first.noted.cpu(), cpu.noted)})",
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if repeatable and torch.equal(first.noted.cpu(), cpu.noted) and gap < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
