"""The fixed 64-bit hash and the seeded generators everything reproducible is drawn from (docs/design.md: "Global
batch and order", "Write", "The sharded note dictionary").

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


def _as_int64(value: int) -> int:
    """A 64-bit pattern as the signed integer torch's int64 holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def logical_shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """`z >> bits` with z read as an unsigned 64-bit integer."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)  # int64's >> copies the sign bit; uint64's does not


def mix64_tensor(ids: torch.Tensor) -> torch.Tensor:
    """`mix64` on an int64 tensor, on its own device (no host round trip): the same 64 bits, held as int64.

    Additions and products wrap modulo 2**64 in two's complement, exactly as numpy's uint64 arithmetic does.
    """
    z = ids.to(torch.int64) + _as_int64(int(GOLDEN))
    z = (z ^ logical_shift_right(z, 30)) * _as_int64(0xBF58476D1CE4E5B9)
    z = (z ^ logical_shift_right(z, 27)) * _as_int64(0x94D049BB133111EB)
    return z ^ logical_shift_right(z, 31)


def unsigned_mod(z: torch.Tensor, modulus: int) -> torch.Tensor:
    """(z read as an unsigned 64-bit integer) mod `modulus`, for int64 `z`."""
    wrapped = (z.remainder(modulus) + (1 << 64) % modulus).remainder(modulus)  # z < 0 stands for z + 2**64
    return torch.where(z < 0, wrapped, z.remainder(modulus))


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator whose stream is a function of the integers `parts` only (folded with mix64)."""
    key = np.uint64(0)
    for part in parts:
        key = mix64(key ^ np.uint64(part))
    return torch.Generator().manual_seed(int(key) & (2**63 - 1))
