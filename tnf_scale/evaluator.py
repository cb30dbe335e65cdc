"""Held-out evaluation: a fixed, masked share of the held-out set on every rank, scored as the model will be exported
(no notes) and, for TNF runs, with notes read under the training's leak-free rule (never written)."""

from __future__ import annotations

import torch

from tnf_scale.distributed import all_reduce_sum
from tnf_scale.feeder import StepFeeder
from tnf_scale.model.objective import LossSums, Objective
from tnf_scale.notes.io import NoteIO
from tnf_scale.step_strategy import StepStrategy


class Evaluator:
    """The objective's held-out metrics, summed over every rank whatever the split into ranks and stages."""

    def __init__(
        self,
        feeder: StepFeeder,
        notes: NoteIO | None,
        strategy: StepStrategy,
        objective: Objective,
        device: torch.device,
    ):
        self.feeder, self.notes, self.strategy, self.objective, self.device = feeder, notes, strategy, objective, device

    @torch.no_grad()
    def evaluate(self, with_notes: bool) -> list[LossSums]:
        """Each loss term's held-out losses, summed over ranks. Collective."""
        batches = self.feeder.eval_batches()
        rows = self.notes.read(batches) if with_notes else [None] * len(batches)
        sums = self.strategy.evaluate(batches, rows)
        if with_notes:
            self.notes.store.take_traffic()  # eval reads are not a training step's traffic
        flat = all_reduce_sum([x for term in sums for x in term.as_list()], self.device)
        width = len(LossSums().as_list())
        return [LossSums(*flat[i : i + width]) for i in range(0, len(flat), width)]

    def metrics(self) -> dict[str, float]:
        """The objective's held-out metrics: the model as it will be exported, and with notes for TNF runs."""
        plain = self.evaluate(with_notes=False)
        return self.objective.eval_metrics(plain, self.evaluate(with_notes=True) if self.notes is not None else None)
