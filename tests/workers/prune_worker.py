"""Save one checkpoint of a run through the real Checkpointer, with an engine that writes a model file and then, with
`kill`, SIGKILLs this process halfway through the save; otherwise the save completes and prunes.

Usage: prune_worker.py RUN STEP KEEP kill|finish [PROTECTED_CHECKPOINT]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tnf_scale.checkpoint import Checkpointer, CheckpointMarker, ResumePoint
from tnf_scale.distributed import ParallelDims, discover, init_distributed
from tnf_scale.run_dir import RunDir
from tnf_scale.run_state import TrainingProgress


class HalfwayEngine:
    """The engine methods a save calls: DeepSpeed's files are one model file; `kill` dies right after writing it."""

    def __init__(self, kill: bool):
        self.kill = kill

    def save_checkpoint(self, root: str, tag: str) -> None:
        ckpt = Path(root) / tag
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1 << 16))
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)

    def zero_optimization_stage(self) -> int:
        return 1


def main(run: Path, step: int, keep: int, mode: str, protected: str | None) -> None:
    topo = init_distributed(discover(), ParallelDims(1, 1))
    vocab = run / "rare_vocab.tsv"
    vocab.write_text("word\t3\n")
    checkpointer = Checkpointer(RunDir(run), topo, vocab, None, save_interval=1, keep_checkpoints=keep)
    progress = TrainingProgress(step=step)
    checkpointer.start(HalfwayEngine(mode == "kill"), {"progress": progress})
    if protected:  # as `plan` leaves it for a run resumed from that checkpoint
        ckpt = Path(protected)
        checkpointer.point = ResumePoint(ckpt, CheckpointMarker.read(ckpt), {})
    checkpointer.save(step)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
