"""Count the operations that would make the host wait for a GPU inside training steps (run under `deepspeed`).

Usage: sync_worker.py OUT TRAIN_FLAGS... : builds the run as train.py does, trains two steps, then counts the ops
of the third and fourth (their collation aside) under a TorchDispatchMode and writes, per step, {op: {owner:
count}} as JSON into OUT.rankN.json for each rank N; the owner is the package whose code called the op (tnf_scale
with file and line, deepspeed, transformers or torch).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tnf_scale.config import parse_args
from tnf_scale.model.build import build_objective, pipeline_refusal
from tnf_scale.startup import start
from tnf_scale.train import note_store
from tnf_scale.trainer import build_training

# Ops whose result size or value the host must read from the device: on CUDA each one waits for the queue.
SYNCING = {
    "aten::_local_scalar_dense": "a scalar read (item, int, float, bool)",
    "aten::nonzero": "nonzero",
    "aten::_unique2": "unique",
    "aten::unique_consecutive": "unique_consecutive",
    "aten::unique_dim": "unique",
    "aten::bincount": "bincount",
    "aten::repeat_interleave": "repeat_interleave without output_size",
    "aten::masked_select": "masked_select",
}
OWNERS = ("tnf_scale", "deepspeed", "transformers")


def boolean_index(func, args) -> bool:
    """An index or index_put with a boolean mask (a nonzero under the hood)."""
    if func.name() not in ("aten::index.Tensor", "aten::index_put_", "aten::index_put"):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))


def owner() -> str:
    """The innermost package of ours or a library's on the Python stack."""
    for frame in reversed(traceback.extract_stack()):
        for name in OWNERS:
            if f"/{name}/" in frame.filename and "sync_worker" not in frame.filename:
                return f"{name}:{Path(frame.filename).name}:{frame.lineno}" if name == "tnf_scale" else name
    return "torch"


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        kind = SYNCING.get(name)
        if name == "aten::repeat_interleave" and kwargs.get("output_size") is not None:
            kind = None
        if kind is None and boolean_index(func, args):
            kind = "boolean indexing"
        if kind is not None:
            self.counts[(kind, owner())] += 1
        return func(*args, **kwargs)


def main(out: Path, argv: list[str]) -> None:
    cfg = parse_args(argv)
    started = start(cfg, pipeline_refusal(cfg))
    objective = build_objective(cfg, started.data.tokenizer)
    store = note_store(cfg, len(started.data.rare_vocab), objective.model_config.initializer_range, started.topo)
    training = build_training(cfg, objective, started.ds_config, started.topo, started.data, store)
    for step in range(2):
        training.trainer.train_step(step)
    steps = []
    for step in range(2, 4):
        # collation is host work on host tensors (the prefetcher's worker does it on a GPU node): counted out
        batches = training.feeder.train_batches(step)
        training.feeder.train_batches = lambda _, batches=batches: batches
        with SyncCounter() as counter:
            training.trainer.train_step(step)
        steps.append({f"{kind} @ {where}": n for (kind, where), n in sorted(counter.counts.items())})
    out.with_suffix(f".rank{started.topo.rank}.json").write_text(json.dumps(steps, indent=1) + "\n")
    training.feeder.close()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), args[1:])
