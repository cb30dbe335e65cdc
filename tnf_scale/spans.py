"""Span geometry of rare occurrences: an occurrence is (sample, start, end), an inclusive token span.

A ground-floor module: the collator (which spans read a note), the note math and the model hooks use it.
"""

from __future__ import annotations

import torch


def expand_spans(
    sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices (sample * seq_len + position) of every span, and the occurrence each belongs to."""
    lengths = end - start + 1
    occ = torch.repeat_interleave(torch.arange(len(start), device=start.device), lengths)
    first_of_occ = torch.cumsum(lengths, 0) - lengths
    offset = torch.arange(len(occ), device=start.device) - first_of_occ[occ]
    return sample[occ] * seq_len + start[occ] + offset, occ


def spans_holding(flags: torch.Tensor, sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """For each span [start, end] of row `sample`, whether any position in it has `flags` set (by prefix sums).

    `flags` is (batch, seq_len) bool, e.g. the tokens the objective asks the model to predict.
    """
    prefix = torch.nn.functional.pad(torch.cumsum(flags.long(), dim=1), (1, 0))  # prefix[:, j] = flags set before j
    return prefix[sample, end + 1] - prefix[sample, start] > 0


def span_positions(
    sample: torch.Tensor, start: torch.Tensor, end: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """(batch, seq_len) bool: True at every position inside one of the spans."""
    token_index, _ = expand_spans(sample, start, end, shape[1])
    return (
        torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=start.device)
        .index_fill_(0, token_index, True)
        .view(shape)
    )
