"""Process-group start-up and the few collectives the trainer itself needs."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_world_size() -> int:
    """The world size the launcher announced (1 for a lone process), readable before any process group exists."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def init_distributed() -> World:
    """Start the process group DeepSpeed uses; a lone `python -m tnf_scale.train` becomes rank 0 of 1."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    rank, size = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    return World(rank, local_rank, size, torch.device(accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    deepspeed.comm.all_reduce(t)
    return t.tolist()
