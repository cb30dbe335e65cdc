"""Global batches (docs/design.md, "Global batch and order"): which samples step n trains on, and each data-parallel
rank's share.

Step n trains on order positions [n*B, (n+1)*B) of an endless stream that visits the training set in a fresh
seeded permutation every epoch. A sample's order key is its order position.
"""

from __future__ import annotations

import torch

from tnf_scale.seeding import seeded_generator


class GlobalBatchSampler:
    """Which samples, in which order, step n trains on: a function of (seed, n, B) and the data size."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        self.num_samples, self.batch, self.seed = num_samples, global_batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.num_samples, generator=seeded_generator(self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def step(self, n: int) -> tuple[list[int], list[int], list[int]]:
        """(dataset indices, order keys, epochs) of the global batch of step n, in order."""
        return self.at(list(range(n * self.batch, (n + 1) * self.batch)))

    def at(self, keys: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(dataset indices, order keys, epochs) of the samples at order positions `keys`."""
        epochs = [k // self.num_samples for k in keys]
        indices = [int(self._permutation(e)[k % self.num_samples]) for k, e in zip(keys, epochs)]
        return indices, keys, epochs


def local_share(items: list, rank: int, world_size: int) -> list:
    """This data-parallel rank's contiguous share of `items`: all of them over the ranks, shares differing by at most
    one
    (a global batch divides evenly; a held-out set need not)."""
    per_rank, extra = divmod(len(items), world_size)
    start = rank * per_rank + min(rank, extra)
    return items[start : start + per_rank + (rank < extra)]
