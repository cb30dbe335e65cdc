"""The fixed 64-bit hash and the seeded generators everything reproducible is drawn from (TNF_SPEC sections 2, 3, 5).

A ground-floor module: the data (order, masks) and the notes (owners, initial rows) both build on it.
"""
from __future__ import annotations

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray | int) -> np.ndarray:
    """SplitMix64's finalizer: a fixed 64-bit integer mixer (the same on every machine)."""
    z = np.asarray(x, dtype=np.uint64) + GOLDEN
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator whose stream is a function of the integers `parts` only (folded with mix64)."""
    key = np.uint64(0)
    for part in parts:
        key = mix64(key ^ np.uint64(part))
    return torch.Generator().manual_seed(int(key) & (2**63 - 1))
