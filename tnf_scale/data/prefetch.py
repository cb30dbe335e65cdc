"""The input pipeline off the critical path: step n+1's micro-batches are collated on a background thread while step n
trains (the collator is Python; the step spends its time in torch kernels that release the GIL).

What a step receives is exactly what collating it on the spot gives: masks and order come from (seed, epoch, order
key), never from a generator's state, so the thread changes when a batch is built, not what it holds.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from tnf_scale.data.sampler import Batch


class StepPrefetcher:
    """`get(n)` returns `make(n)` and starts `make(n + 1)` in the background; one step ahead, one thread.

    With `ahead=False` every step is collated on the spot: where the step computes on the same host cores (a CPU-only
    run), the thread only takes cores from it.
    """

    def __init__(self, make: Callable[[int], list[Batch]], ahead: bool = True):
        self.make, self.ahead = make, ahead
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collate")
        self.pending: tuple[int, Future] | None = None

    def get(self, step: int) -> list[Batch]:
        if not self.ahead:
            return self.make(step)
        if self.pending is not None and self.pending[0] == step:
            batches = self.pending[1].result()
        else:
            if self.pending is not None:
                self.pending[1].result()  # never two collations at once: the sampler's permutation cache is not shared
            batches = self.make(step)
        self.pending = (step + 1, self.pool.submit(self.make, step + 1))
        return batches
