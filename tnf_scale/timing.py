"""Wall-clock seconds per named phase of a piece of work (a training step, data preparation)."""

from __future__ import annotations

import time
from collections.abc import Callable


class PhaseTimer:
    """Accumulates the seconds since the previous lap into each phase, in the order phases first appear.

    `sync` runs before each reading of the clock (the accelerator's synchronize, so that queued device work lands in
    its own phase); without it the timer never waits on a device.
    """

    def __init__(self, phases: tuple[str, ...] = (), sync: Callable[[], None] | None = None):
        self.seconds: dict[str, float] = dict.fromkeys(phases, 0.0)
        self._sync = sync
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap (or the start) to `phase`."""
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now
