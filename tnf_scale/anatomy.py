"""Where a DeepSpeed engine's step goes: forward, backward, gradient accumulation, the boundary reduction and the
optimizer, timed inside DeepSpeed's own methods, so that tnf_scale's trainer and the Hugging Face Trainer peer (both
drive a DeepSpeed engine) are split the same way.

Each phase is charged the time of its method less that of the timed methods it calls (the engine's `step` holds the
optimizer's; its backward holds the accumulation into fp32 and, at a boundary, the reduction), so the phases add up
to the time spent in the engine. `sync` (the accelerator's synchronize) runs before each clock reading when given;
without it, on a GPU, a phase holds the time its work was queued in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

ENGINE_PHASES = ("forward", "backward", "accumulation", "reduction", "optimizer")
# a training step of tnf_scale's trainer, in order: the engine's phases, what else ran while the step strategy drove
# the engine (hooks, loss sums; a pipeline's schedule), and the trainer's own phases around them
STEP_PHASES = ("data", "note_read", *ENGINE_PHASES, "engine_other", "note_write")


class EngineClock:
    """Seconds per phase of the engine work since the last `take`, from wrappers on DeepSpeed's classes."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync
        self.seconds = dict.fromkeys(ENGINE_PHASES, 0.0)
        self._inner: list[float] = []  # per timed call in progress: the seconds of the timed calls inside it

    def take(self) -> dict[str, float]:
        """The seconds per phase since the previous call, and start again from zero."""
        seconds, self.seconds = self.seconds, dict.fromkeys(ENGINE_PHASES, 0.0)
        return seconds

    def timed(self, phase: str, method: Callable) -> Callable:
        """`method`, charging its own time (less the timed calls inside it) to `phase`."""

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            if self.sync is not None:
                self.sync()
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return method(*args, **kwargs)
            finally:
                if self.sync is not None:
                    self.sync()
                elapsed = time.perf_counter() - start
                self.seconds[phase] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return wrapper


def timed_methods() -> list[tuple[type, str, str]]:
    """(class, method, phase) of every DeepSpeed method the clock wraps."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.engine import DeepSpeedEngine

    return [
        (DeepSpeedEngine, "forward", "forward"),
        (DeepSpeedEngine, "backward", "backward"),
        (BF16_Optimizer, "update_hp_grads", "accumulation"),  # each micro-batch's bf16 gradients added into fp32
        (DeepSpeedEngine, "allreduce_gradients", "reduction"),
        (DeepSpeedEngine, "step", "optimizer"),
        (DeepSpeedEngine, "_take_model_step", "optimizer"),  # what the pipeline schedule calls in place of `step`
    ]


def engine_split(in_engine: float, clock_seconds: dict[str, float]) -> dict[str, float]:
    """The seconds of a stretch spent driving the engine (`in_engine`), split into the clock's phases and the rest
    (`engine_other`)."""
    return {**clock_seconds, "engine_other": max(in_engine - sum(clock_seconds.values()), 0.0)}


_installed: EngineClock | None = None


def install_engine_clock(sync: Callable[[], None] | None = None) -> EngineClock:
    """Wrap DeepSpeed's engine methods with one process-wide clock (once: later calls return the same clock, with the
    first call's `sync`)."""
    global _installed
    if _installed is None:
        _installed = EngineClock(sync)
        for cls, name, phase in timed_methods():
            setattr(cls, name, _installed.timed(phase, getattr(cls, name)))
    return _installed
