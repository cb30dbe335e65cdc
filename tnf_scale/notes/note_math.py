"""The note math of docs/design.md ("Read", "Write", "The sharded note dictionary"), written once for every store
and every path.

All functions are tensor code over occurrences; none loops over occurrences in Python.
"""

from __future__ import annotations

import numpy as np
import torch

from tnf_scale.seeding import GOLDEN, logical_shift_right, mix64, mix64_tensor, unsigned_mod


def owner_of(ids: torch.Tensor, world_size: int) -> torch.Tensor:
    """Rank that owns each rare id: mix64(id) mod world_size, computed on the ids' device (no host synchronisation)."""
    return unsigned_mod(mix64_tensor(ids), world_size)


def initial_notes(ids: torch.Tensor, dim: int, seed: int, std: float, chunk: int = 4096) -> torch.Tensor:
    """Normal(0, std) rows whose values depend only on (seed, id): any partition gives the same rows. Computed on the
    ids' device (64-bit hashing with wrapping int64 arithmetic, Box-Muller in float64), in chunks of bounded memory."""
    ids = ids.to(torch.int64)
    seed_key = int(mix64(np.uint64(seed)).astype(np.int64))  # the same 64 bits, as torch's int64 holds them
    counters = torch.arange(2 * dim, dtype=torch.int64, device=ids.device) * int(GOLDEN.astype(np.int64))
    out = torch.empty(len(ids), dim, dtype=torch.float32, device=ids.device)
    for first in range(0, len(ids), chunk):
        row_key = mix64_tensor(ids[first : first + chunk] ^ seed_key)
        bits = mix64_tensor(row_key[:, None] + counters[None, :])
        uniform = (logical_shift_right(bits, 11).to(torch.float64) + 0.5) * 2.0**-53  # in (0, 1)
        u1, u2 = uniform[:, :dim], uniform[:, dim:]
        out[first : first + chunk] = (
            torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * torch.pi * u2) * std
        ).float()  # Box-Muller
    return out


def mix_notes(
    h: torch.Tensor,
    token_index: torch.Tensor,
    token_occ: torch.Tensor,
    rows: torch.Tensor,
    lam: float,
    rows_trainable: bool = False,
) -> torch.Tensor:
    """h_p <- (1 - lam) * h_p + lam * N[r] at every span position; all other positions stay as they are.

    `rows` holds one note per occurrence and is treated as a constant (no gradient), as in pre-training; with
    `rows_trainable` gradients flow into them (the fine-tuning variant that learns the notes by back-propagation).
    """
    batch, seq_len, dim = h.shape
    flat = h.reshape(batch * seq_len, dim).float()  # blended in fp32 (a no-op in fp32 runs), cast once at the end
    weight = flat.new_zeros(batch * seq_len, 1).index_fill_(0, token_index, lam)
    notes = flat.new_zeros(batch * seq_len, dim).index_copy(
        0, token_index, (rows if rows_trainable else rows.detach())[token_occ].float()
    )
    return (flat * (1 - weight) + weight * notes).to(h.dtype).view(batch, seq_len, dim)


def pool_windows(
    context: torch.Tensor, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, lengths: torch.Tensor, k: int
) -> torch.Tensor:
    """Mean of context[j] over j in [max(0, s - k), min(L - 1, t + k)] for each occurrence, by prefix sums.

    `context` is (batch, seq_len, dim); `lengths` is each sample's real (non-padding) length.
    """
    context = context.detach().float()
    prefix = torch.nn.functional.pad(torch.cumsum(context, dim=1), (0, 0, 1, 0))  # prefix[:, j] = sum of context[:, :j]
    lo = torch.clamp(start - k, min=0)
    hi = torch.minimum(end + k, lengths[sample] - 1)
    total = prefix[sample, hi + 1] - prefix[sample, lo]
    return total / (hi - lo + 1).unsqueeze(1).to(total.dtype)


def application_order(ids: torch.Tensor, order_key: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts occurrences by (id, order key, start): the order writes are applied in."""
    perm = torch.argsort(start, stable=True)
    perm = perm[torch.argsort(order_key[perm], stable=True)]
    return perm[torch.argsort(ids[perm], stable=True)]


def ema_sequential(table: torch.Tensor, ids: torch.Tensor, notes: torch.Tensor, gamma: float) -> torch.Tensor:
    """The definition: N[r] <- (1 - gamma) N[r] + gamma * note, one occurrence at a time, in the given order."""
    table = table.clone()
    for r, note in zip(ids.tolist(), notes):
        table[r] = (1 - gamma) * table[r] + gamma * note
    return table


def ema_closed_form(
    ids: torch.Tensor, notes: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine occurrences, already in application order, into one (decay, contribution) per id.

    For the m occurrences of an id: decay = (1 - gamma)^m and
    contribution = sum_i gamma (1 - gamma)^(m - i) note_i, so that N[r] <- decay N[r] + contribution.
    Returns (unique ids, decay (U,), contribution (U, dim)).
    """
    unique, run_of, counts = torch.unique_consecutive(ids, return_inverse=True, return_counts=True)
    run_first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(ids), device=ids.device) - run_first[run_of] + 1  # i, 1-based within the run
    keep = 1.0 - gamma  # a Python float: a device scalar made of it would be a blocking copy to the device
    weight = (gamma * torch.pow(keep, (counts[run_of] - rank).double())).to(notes.dtype)
    # One sequential sum per run (the runs are contiguous): deterministic on every device, where CUDA's index_add_
    # adds with atomics in no fixed order; on the CPU bit for bit what index_add_ gave.
    contribution = torch.segment_reduce(weight.unsqueeze(1) * notes, "sum", lengths=counts)
    return unique, torch.pow(keep, counts.double()).to(notes.dtype), contribution
