"""The step's note traffic on one rank: one read at the start, one write at the end (docs/design.md, "TNF's semantics").

Roles come from the topology: the rank that feeds the model's inputs (the first pipeline stage) reads, the rank
that sees the last encoder layer (the last stage) writes; without a pipeline every rank does both. Every rank of the
note group takes part in every exchange, with nothing to send when its role does not apply, so that no rank blocks.
"""

from __future__ import annotations

import torch

from tnf_scale.data.batch import Batch
from tnf_scale.distributed import Topology, all_reduce_sum, in_own_slot
from tnf_scale.notes.store import NoteStore

# What a step reports of notes; a run without notes reports them as 0, so that every run's metrics share one schema.
STEP_NOTE_METRICS = ("occurrences_read", "occurrences_skipped_masked", "notes_written")


class NoteIO:
    """Reads and writes of one rank's steps through the sharded store."""

    def __init__(self, store: NoteStore, world: Topology, hidden_size: int):
        self.store, self.device, self.hidden_size = store, world.device, hidden_size
        self.reads, self.writes = world.is_first_stage, world.is_last_stage
        held = in_own_slot(len(store.ids), world.note_group_rank, world.note_group_size)  # rows of each rank
        self.rows_per_rank = [int(n) for n in all_reduce_sum(held, world.device)]

    def read(self, batches: list[Batch]) -> list[torch.Tensor]:
        """The note rows of the reading occurrences (`Batch.read_spans`) of each micro-batch; a rank that feeds no
        inputs asks for nothing and gets empty rows. Collective."""
        counts = [b.num_reads for b in batches]
        ids = torch.cat([b.read_spans[0] for b in batches]) if self.reads else torch.zeros(0, dtype=torch.int64)
        rows = self.store.read(ids)
        if not self.reads:
            return [rows.new_zeros(n, rows.shape[1]) for n in counts]
        return list(torch.split(rows, counts))

    def write(self, batches: list[Batch], pooled: list[torch.Tensor]) -> None:
        """One write of every note this rank took in the step (none when it does not take notes). Collective."""
        if self.writes:
            parts = [torch.cat(x) for x in zip(*((b.occ_rare, b.occ_order_key, b.occ_start) for b in batches))]
            notes = torch.cat(pooled)
        else:
            parts = [torch.zeros(0, dtype=torch.int64, device=self.device)] * 3
            notes = torch.zeros(0, self.hidden_size, device=self.device)
        self.store.write(*parts, notes)

    def step_counts(self, batches: list[Batch]) -> dict[str, float]:
        """This rank's share of the step's note metrics (summed over ranks by the caller) and its traffic since the last
        call; `batches` are the micro-batches this rank counts (none on a stage that does not feed inputs)."""
        occurrences = sum(len(b.occ_rare) for b in batches)
        read = sum(b.num_reads for b in batches)
        counts = dict(zip(STEP_NOTE_METRICS, (read, occurrences - read, occurrences)))
        return {**counts, **{f"note_{k}": v for k, v in self.store.take_traffic().items()}}

    def distinct_noted(self) -> int:
        """Words noted at least once so far, over the whole dictionary: a metric read only when a step is logged (it
        reads a count back from the device). Collective."""
        return int(all_reduce_sum([self.store.distinct_noted()], self.device)[0])

    def balance(self) -> dict[str, int]:
        """How evenly the dictionary's rows are spread: the most and fewest rows a rank holds."""
        return {"note_rows_max_rank": max(self.rows_per_rank), "note_rows_min_rank": min(self.rows_per_rank)}
