"""The run's resume state that is not DeepSpeed's: training progress and the random streams.

Every component with resume state exposes `state_dict()` / `load_state_dict()` (torch's convention); the
checkpointer takes them by name and decides where each part is kept: tensors in each rank's file, plain values in
the checkpoint's marker. A component whose rows are spread over the ranks (the note store) sets `sharded_state`
and is handed the union of every rank's rows on load, so that it can re-partition them.

The data position needs no state of its own: which samples a step trains on, and their masks, are a function of
(seed, step, global batch size) and the data (data/sampler.py), so the progress's step is the data position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


class Stateful(Protocol):
    """What the checkpointer saves and restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingProgress:
    """Steps done, tokens trained on and training wall time (evaluation excluded), summed over every rank."""

    step: int = 0
    tokens: int = 0
    wall_time: float = 0.0

    def advance(self, tokens: int, wall_time: float) -> None:
        """One more step, of `tokens` tokens, done after `wall_time` seconds of training in all."""
        self.step, self.tokens, self.wall_time = self.step + 1, self.tokens + tokens, wall_time

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "wall_time": self.wall_time}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens, self.wall_time = state["step"], state["tokens"], state["wall_time"]


class RngStreams:
    """The random streams a step draws from on this rank: torch's CPU generator, and the accelerator's (dropout on a
    GPU draws from the device's generator) when the rank computes on one."""

    KEY = "torch_rng_state"
    ACCELERATOR_KEY = "accelerator_rng_state"

    def __init__(self, accelerator=None):
        """`accelerator`: DeepSpeed's accelerator of this rank's device, or None on the CPU."""
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        state = {self.KEY: torch.get_rng_state()}
        if self.accelerator is not None:
            state[self.ACCELERATOR_KEY] = self.accelerator.get_rng_state().cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's streams; a rank the checkpoint did not have (a larger world) keeps its own."""
        if self.KEY in state:
            torch.set_rng_state(state[self.KEY])
        if self.accelerator is not None and self.ACCELERATOR_KEY in state:
            self.accelerator.set_rng_state(state[self.ACCELERATOR_KEY])
