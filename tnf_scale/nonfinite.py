"""The non-finite guard: a run whose loss or gradient norm stops being finite ends with one sentence, keeping the
last good checkpoint, and is never exported."""

from __future__ import annotations

import math

from tnf_scale.errors import DIVERGED_EXIT, Refusal


class Diverged(Refusal):
    """The run stopped on non-finite steps."""

    exit_status = DIVERGED_EXIT


class NonfiniteGuard:
    """Counts steps whose loss or gradient norm is not finite; both are global (reduced over ranks), so every rank
    decides alike. `healthy` is False from a non-finite step until a finite one: no checkpoint is saved meanwhile."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0  # consecutive non-finite steps up to now
        self.total = 0
        self._last: tuple[float, float | None] = (0.0, None)

    @property
    def healthy(self) -> bool:
        return self.streak == 0

    @property
    def grad_norm(self) -> float | None:
        """The last step's global gradient norm (None: not computed), read from the device once, here."""
        return self._last[1]

    def observe(self, loss: float, grad_norm) -> None:
        """Account one step (its global loss and gradient norm, a float or a one-element tensor; None: not
        computed)."""
        grad_norm = None if grad_norm is None else float(grad_norm)
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        self.streak = 0 if finite else self.streak + 1
        self.total += not finite
        self._last = (loss, grad_norm)

    def stop_if_diverged(self, step: int, last_good_checkpoint: int | None) -> None:
        """Raise Diverged once `limit` consecutive steps, up to step `step`, were not finite."""
        if self.streak < self.limit:
            return
        loss, grad_norm = self._last
        kept = (
            f"the last good checkpoint is step {last_good_checkpoint}"
            if last_good_checkpoint is not None
            else "no checkpoint was saved"
        )
        raise Diverged(
            f"step {step}: the loss or gradient norm was not finite for {self.streak} consecutive steps "
            f"(loss {loss}, gradient norm {grad_norm}), so the run stopped without saving or exporting; {kept} — "
            "lower --lr (or check the data) and resume it with --resume true, or start again."
        )
