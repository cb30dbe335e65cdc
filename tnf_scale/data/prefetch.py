"""The input pipeline off the critical path: the next steps' micro-batches are collated by a `torch.utils.data`
worker process while the current step trains.

What a step receives is exactly what collating it on the spot gives: masks and order come from (seed, epoch, order
key), never from a generator's state, so the worker changes where and when a batch is built, not what it holds. A
process, not a thread: the collator is Python, and a thread would contend for the GIL with the step's own Python.
Batches cross from the worker as numpy arrays, pickled through the loader's pipe: a step's are small (about 0.1 MB on
the bench preset), and torch's shared-memory hand-over of each tensor cost more than collating (7 ms against 1 ms
measured for the bench preset's two micro-batches).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from tnf_scale.data.batch import Batch


class _Steps(Dataset):
    """Item n is step n's micro-batches."""

    def __init__(self, make: Callable[[int], list[Batch]]):
        self.make = make

    def __getitem__(self, step: int) -> list[Batch]:
        return [batch.map(torch.Tensor.numpy) for batch in self.make(step)]


class StepPrefetcher:
    """`get(n)` returns `make(n)`. With `ahead`, one worker process collates steps n+1, n+2 (`depth`) while step n
    trains, and `pin` page-locks what it hands over; a step other than the next (a resume) restarts the worker there.
    Without `ahead`, every step is collated on the spot."""

    def __init__(self, make: Callable[[int], list[Batch]], ahead: bool = True, pin: bool = False, depth: int = 2):
        self.make, self.ahead, self.pin, self.depth = make, ahead, pin, depth
        self.steps: Iterator[list[Batch]] | None = None
        self.next_step: int | None = None

    def get(self, step: int) -> list[Batch]:
        if not self.ahead:
            return self.make(step)
        if step != self.next_step:
            self.close()
            # A generator of its own: the loader draws its workers' base seed from it, and drawing it from torch's
            # global generator would shift the model's dropout (the collator seeds every sample itself).
            loader = DataLoader(
                _Steps(self.make),
                batch_size=None,
                sampler=itertools.count(step),
                num_workers=1,
                prefetch_factor=self.depth,
                multiprocessing_context="fork",
                generator=torch.Generator(),
            )
            self.steps = iter(loader)
        self.next_step = step + 1
        batches = [batch.map(torch.from_numpy) for batch in next(self.steps)]
        return [batch.pin_memory() for batch in batches] if self.pin else batches

    def close(self) -> None:
        """Stop the worker, if one runs (the loader's iterator shuts its workers down when it is dropped)."""
        self.steps = self.next_step = None
