"""The per-task GPU binding, simulated: two ranks that each see one device (CUDA_VISIBLE_DEVICES=0 for both, LOCAL_RANK
0 and 1, as SLURM's --gpus-per-task=1 leaves them), gathered on gloo: the device index each rank takes and the one
DeepSpeed's engine chooses must both be 0. Usage: python -m tnf_scale.node_check.binding OUT.md"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.distributed import deepspeed_rank_env, rank_device_index
from tnf_scale.launch import free_port

RANKS = 2


def choices(local_rank: int) -> list[int]:
    """[local rank, this project's device index (-1: the CPU), DeepSpeed engine's local_rank, CUDA's current device]."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    index = rank_device_index(local_rank, get_accelerator())
    os.environ.update(deepspeed_rank_env(local_rank, index, dict(os.environ)))
    engine = SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(engine, SimpleNamespace(local_rank=None), None)
    current = -1
    if index is not None:
        get_accelerator().set_device(index)
        current = torch.cuda.current_device()
    return [local_rank, -1 if index is None else index, engine.local_rank, current]


def bound(rows: list[list[int]]) -> bool:
    """Every rank took index 0 of its one device and DeepSpeed chose the same (on the CPU, where there is no device,
    DeepSpeed keeps the local rank)."""
    return all(
        chosen == local if index == -1 else index == chosen == current == 0 for local, index, chosen, current in rows
    )


def rank_main(rank: int, out: Path) -> int:
    torch.distributed.init_process_group("gloo", rank=rank, world_size=RANKS)
    rows = [None] * RANKS
    torch.distributed.all_gather_object(rows, choices(rank))
    if rank == 0:
        lines = [
            "| rank | local rank | device index | DeepSpeed's local_rank | CUDA current device |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {r} | {a} | {b} | {c} | {d} |" for r, (a, b, c, d) in enumerate(rows)]
        verdict = "yes" if bound(rows) else "NO"
        lines.append(f"\nEvery rank bound to its one visible device (index 0; the CPU: none): {verdict}.")
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    torch.distributed.destroy_process_group()
    return 0 if bound(rows) else 1


def main(out: Path) -> int:
    """Start the two ranks and wait for both."""
    port = str(free_port())
    procs = []
    for rank in range(RANKS):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(RANKS), "LOCAL_RANK": str(rank)}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if get_accelerator().device_name() == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = "0"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tnf_scale.node_check.binding", "--rank", str(rank), str(out)], env=env
            )
        )
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    if sys.argv[1] == "--rank":
        sys.exit(rank_main(int(sys.argv[2]), Path(sys.argv[3])))
    sys.exit(main(Path(sys.argv[1])))
