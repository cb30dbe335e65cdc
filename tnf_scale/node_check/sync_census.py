"""Where a training step makes the host wait for the GPU, counted by torch's own sync debug mode and grouped by the
caller. Usage: python -m tnf_scale.node_check.sync_census OUT.md [train.py flags]

Every synchronizing CUDA call inside the counted steps (all but the first FIRST_COUNTED) raises torch's warning; each
is charged to its innermost frame in this project (file:function), else in DeepSpeed or transformers, else "other".
A CPU has no device to wait for, and torch's sync debug mode watches CUDA only: there the census says so.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import deepspeed
import torch
import transformers

import tnf_scale
from tnf_scale import train
from tnf_scale.trainer import Trainer

FIRST_COUNTED = 3  # the first steps build caches and compile kernels
OWNERS = {module.__name__: str(Path(module.__file__).parent) for module in (tnf_scale, deepspeed, transformers)}


def caller() -> str:
    """The innermost frame of this stack in an owner, as `tnf_scale/file.py:function` or the library's name; the
    census's own frames (the hook, the wrapped step) are no caller."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == __file__:
            continue
        for name, root in OWNERS.items():
            if frame.filename.startswith(root):
                return f"{name}{frame.filename[len(root) :]}:{frame.name}" if name == "tnf_scale" else name
    return "other"


def counting(counts: Counter):
    """A warnings.showwarning that counts each warning against its caller instead of printing it."""

    def record(message, category, filename, lineno, file=None, line=None):
        counts[caller()] += 1

    return record


def census_table(counts: Counter, steps: int) -> str:
    """The counts per counted step, largest first, as markdown."""
    if not steps:
        return "No step was counted.\n"
    rows = [f"| {where} | {n / steps:g} |" for where, n in counts.most_common()]
    total = sum(counts.values()) / steps
    head = [f"{steps} steps counted; {total:g} host syncs per step.", "", "| caller | per step |", "|---|---|"]
    return "\n".join([*head, *rows]) + "\n"


def main(out: Path, argv: list[str]) -> int:
    if not torch.cuda.is_available():
        status = train.main(argv)
        out.write_text("No CUDA device: torch's sync debug mode watches CUDA only, so nothing was counted.\n")
        return status
    counts, counted = Counter(), [0]
    train_step = Trainer.train_step

    def censused_step(self, step):
        if step < FIRST_COUNTED:
            return train_step(self, step)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = counting(counts)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return train_step(self, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counted[0] += 1

    Trainer.train_step = censused_step
    status = train.main(argv)
    out.write_text(census_table(counts, counted[0]))
    print(out.read_text(), end="")
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
