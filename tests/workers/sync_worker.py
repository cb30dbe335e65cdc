"""Count the host's reads of device values in whole iterations of the training loop (run under `deepspeed`).

Usage: sync_worker.py OUT TRAIN_FLAGS... : runs train.py's own loop (`tnf_scale.train.run`) for 6 steps, logged every
2, and counts (tests/workers/sync_counter.py) from one step boundary to the next: iteration 2 (a step that is not
logged), 3 (a logged one) and 4 (not logged, with one read of each kind planted after the step: the counter's
self-test). Each iteration holds all of the loop's work: the stop agreement, the step, the non-finite guard, the
metrics record when logged, the checkpoint check; collation is host work on host tensors (the prefetcher's worker
does it on a GPU node) and is left out. Writes {"unlogged", "logged", "planted"} of {"kind @ owner": n} as JSON
into OUT.rankN.json for each rank N.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import deepspeed
import torch
import transformers
from sync_counter import SyncCounter

import tnf_scale
from tnf_scale import train
from tnf_scale.feeder import StepFeeder
from tnf_scale.stopping import StopRequest
from tnf_scale.trainer import Trainer

LOOP = ["--max_steps", "6", "--log_interval", "2", "--eval_interval", "1000", "--save_interval", "0",
        "--export", "false", "--save_notes", "false"]  # fmt: skip
COUNTED = {2: "unlogged", 3: "logged", 4: "planted"}  # step index -> name


def planted_reads(values: torch.Tensor) -> dict[str, object]:
    """One read of each kind the counter knows, on a device tensor of the step: kind -> the read."""
    flat = values.detach().flatten()[:8].float()
    ones = (flat * 0 + 1).long()
    return {
        "item": lambda: flat[0].item(),
        "tolist": lambda: flat.tolist(),
        "cpu": lambda: flat.cpu(),
        "numpy": lambda: flat.numpy(),
        "bool": lambda: bool(flat[0] > -1e30),
        "int": lambda: int(ones[0]),
        "float": lambda: float(flat[0]),
        "index": lambda: [0, 1][ones[0] - 1],
        "format": lambda: f"{flat[0]:.3f}",
        "equal": lambda: torch.equal(flat, flat),
        "is_nonzero": lambda: ones[:1].is_nonzero(),
        "nonzero": lambda: torch.nonzero(flat > 0),
        "unique": lambda: torch.unique(ones),
        "unique_consecutive": lambda: torch.unique_consecutive(ones),
        "bincount": lambda: torch.bincount(ones),
        "repeat_interleave": lambda: torch.repeat_interleave(ones, ones),
        "masked_select": lambda: torch.masked_select(flat, flat > 0),
        "boolean index": lambda: flat[flat > 0],
        "copy of Python values": lambda: torch.tensor([1.0, 2.0], device=flat.device),
    }


def main(out: Path, argv: list[str]) -> int:
    owners = {
        "tnf_scale": Path(tnf_scale.__file__).parent,
        "deepspeed": Path(deepspeed.__file__).parent,
        "transformers": Path(transformers.__file__).parent,
        "plant": Path(__file__),
    }
    counter = SyncCounter(owners, detailed=("tnf_scale", "deepspeed", "transformers"))  # "plant": one name
    counts: dict[str, dict[str, int]] = {}
    boundaries = {"step": 0}
    agreed, train_batches, train_step = StopRequest.agreed, StepFeeder.train_batches, Trainer.train_step

    def counted_agreed(self, device):  # a step boundary: the iteration before it ends, the next one begins
        step = boundaries["step"]
        if counter.running:
            counts[COUNTED[step - 1]] = counter.stop()
        if step in COUNTED:
            counter.start()
        boundaries["step"] += 1
        return agreed(self, device)

    def uncounted_collation(self, step):
        with counter.paused():
            return train_batches(self, step)

    def planted_step(self, step):
        result = train_step(self, step)
        if COUNTED.get(step) == "planted":
            for read in planted_reads(next(self.engine.module.parameters())).values():
                read()
        return result

    StopRequest.agreed, StepFeeder.train_batches, Trainer.train_step = counted_agreed, uncounted_collation, planted_step
    status = train.main([*argv, *LOOP])
    rank = int(os.environ.get("RANK", 0))
    out.with_suffix(f".rank{rank}.json").write_text(json.dumps(counts, indent=1) + "\n")
    return status


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    sys.exit(main(Path(args[0]), args[1:]))
