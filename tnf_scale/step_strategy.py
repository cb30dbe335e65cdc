"""How a step's micro-batches go through the engine: data parallel (forward, backward, step per micro-batch) or
DeepSpeed's pipeline schedule. Both take the notes read for each micro-batch and hand back the notes taken, so the
trainer and the evaluator never ask which one runs."""

from __future__ import annotations

from typing import Protocol

import torch

from tnf_scale.data.batch import Batch
from tnf_scale.model.objective import LossSums, Objective, loss_parts
from tnf_scale.model.pipeline import PipelineObjective
from tnf_scale.model.tnf_bert import TnfHooks

NoteRows = list[torch.Tensor | None]  # per micro-batch, the note rows of its reading occurrences (None: no notes)


class StepStrategy(Protocol):
    def train(self, batches: list[Batch], rows: NoteRows, scales: list[float]) -> tuple[list[float], list]:
        """Forward, backward and optimizer step over the micro-batches (each term's summed loss, times its scale, is
        what backward sees); returns each term's summed loss and the notes taken per micro-batch."""

    def evaluate(self, batches: list[Batch], rows: NoteRows) -> list[LossSums]:
        """Each loss term's held-out losses over the micro-batches, notes mixed in where rows are given."""


class DataParallelStep:
    """The objective under DeepSpeed's engine (ZeRO 0-3), notes entering through the hooks on its networks."""

    def __init__(self, engine, objective: Objective, hooks: TnfHooks | None):
        self.engine, self.objective, self.hooks = engine, objective, hooks

    def _set_reads(self, batch: Batch, rows: torch.Tensor) -> None:
        self.hooks.set_reads(batch.read_token_index, batch.read_token_occ, rows)

    def _term_losses(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Per loss term, the loss of every position it averages over (row-major order)."""
        return self.engine(**self.objective.inputs(batch))

    def train(self, batches: list[Batch], rows: NoteRows, scales: list[float]) -> tuple[list[float], list]:
        totals, pooled = None, []
        for batch, batch_rows in zip(batches, rows):
            if self.hooks is not None:
                self._set_reads(batch, batch_rows)
                self.hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
            sums = [term.sum() for term in self._term_losses(batch)]
            self.engine.backward(sum(term * scale for term, scale in zip(sums, scales) if scale))
            self.engine.step()
            step_sums = torch.stack([term.detach().double() for term in sums])
            totals = step_sums if totals is None else totals + step_sums  # in order, in float64: as Python adds
            if self.hooks is not None:
                pooled.append(self.hooks.pooled)
                self.hooks.clear()
        # each term's sum over the micro-batches: one read back from the device a step
        return totals.tolist() if totals is not None else [0.0] * len(scales), pooled

    def evaluate(self, batches: list[Batch], rows: NoteRows) -> list[LossSums]:
        parts = [0] * len(self.objective.term_weights)
        self.engine.eval()
        for batch, batch_rows in zip(batches, rows):
            if batch_rows is not None:
                self._set_reads(batch, batch_rows)
            for term, (losses, index) in enumerate(zip(self._term_losses(batch), self.objective.term_index(batch))):
                parts[term] = parts[term] + loss_parts(losses, batch.in_rare_span.flatten()[index])
            if self.hooks is not None:
                self.hooks.clear()
        self.engine.train()
        return [LossSums.from_parts(term) if batches else LossSums() for term in parts]


class PipelineStep:
    """BERT's masked LM on DeepSpeed's pipeline schedule: the notes read for a micro-batch travel into the first stage
    with its inputs, the last stage's loss function pools the notes taken (`PipelineObjective`)."""

    def __init__(self, engine, stage_loss: PipelineObjective, hidden_size: int, device: torch.device, take_notes: bool):
        self.engine, self.stage_loss, self.hidden_size, self.device = engine, stage_loss, hidden_size, device
        self.take_notes = take_notes

    def _items(self, batches: list[Batch], rows: NoteRows):
        for batch, batch_rows in zip(batches, rows):
            if batch_rows is None:  # no notes: an empty mix
                batch_rows = torch.zeros(0, self.hidden_size, device=self.device)
                token_index = token_occ = torch.zeros(0, dtype=torch.int64, device=self.device)
            else:
                token_index, token_occ = batch.read_token_index, batch.read_token_occ
            yield (
                (batch.input_ids, batch.attention_mask, token_index, token_occ, batch_rows),
                (
                    batch.predicted_index,
                    batch.labels.flatten()[batch.predicted_index],
                    batch.in_rare_span.flatten()[batch.predicted_index],
                    batch.occ_sample,
                    batch.occ_start,
                    batch.occ_end,
                    batch.lengths,
                ),
            )

    def train(self, batches: list[Batch], rows: NoteRows, scales: list[float]) -> tuple[list[float], list]:
        (scale,) = scales  # the masked LM: one term
        self.stage_loss.start(scale, self.take_notes)
        self.engine.train_batch(iter(self._items(batches, rows)))
        return [self.stage_loss.sums().ce], self.stage_loss.pooled

    def evaluate(self, batches: list[Batch], rows: NoteRows) -> list[LossSums]:
        self.stage_loss.start(1.0, take_notes=False)
        self.engine.eval()
        self.engine.eval_batch(iter(self._items(batches, rows)), num_micro_batches=len(batches))
        self.engine.train()
        return [self.stage_loss.sums()]
