"""One TNF training step (read notes -> DeepSpeed forward/backward/step -> write notes), and evaluation.

The loss of a step is the mean cross-entropy over every masked token of the global batch,
whatever the split into ranks and micro-batches: each micro-batch's summed loss is scaled by
(ranks x accumulation steps / masked tokens in the global batch), which DeepSpeed's own
1/accumulation and 1/ranks averaging turn back into that mean.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.config import RunConfig
from tnf_scale.data.sampler import EVAL_EPOCH, Batch, Collator, GlobalBatchSampler, local_share
from tnf_scale.distributed import World, all_reduce_sum
from tnf_scale.model.tnf_bert import TnfHooks
from tnf_scale.notes.store import NoteStore


@dataclass
class StepResult:
    """One step, summed over all data-parallel ranks."""

    loss: float
    tokens: int
    seconds: float
    notes: dict[str, float]  # occurrences, distinct words noted, note traffic; empty without TNF
    phases: dict[str, float]  # seconds this rank spent in data, note_read, forward, backward, optimizer, note_write


class PhaseTimer:
    """Wall-clock seconds per phase of a step; synchronizes the accelerator so GPU work lands in its phase."""

    def __init__(self):
        self.seconds = dict.fromkeys(("data", "note_read", "forward", "backward", "optimizer", "note_write"), 0.0)
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        get_accelerator().synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


class TnfTrainer:
    """Runs steps and evaluations of one DeepSpeed engine, with or without notes."""

    def __init__(self, cfg: RunConfig, engine, world: World, train_set, eval_set, collator: Collator,
                 hooks: TnfHooks | None, store: NoteStore | None):
        self.cfg, self.engine, self.world = cfg, engine, world
        self.train_set, self.eval_set, self.collator = train_set, eval_set, collator
        self.hooks, self.store = hooks, store
        self.sampler = GlobalBatchSampler(len(train_set), cfg.global_batch_size, cfg.seed)
        self.grad_accum = engine.gradient_accumulation_steps()
        self.rows_per_rank: list[int] = []
        if store is not None:
            one_hot = [0.0] * world.size
            one_hot[world.rank] = len(store.ids)
            self.rows_per_rank = [int(n) for n in all_reduce_sum(one_hot, world.device)]

    def _micro_batches(self, dataset, indices: list[int], keys: list[int], epochs: list[int]) -> list[Batch]:
        mb = self.cfg.micro_batch_size
        return [self.collator(dataset, indices[i : i + mb], keys[i : i + mb], epochs[i : i + mb]) for i in range(0, len(indices), mb)]

    def _read_notes(self, batches: list[Batch]) -> list[torch.Tensor]:
        """One read for all of this rank's occurrences in the step, split back per micro-batch."""
        ids = torch.cat([b.occ_rare for b in batches])
        rows = self.store.read(ids)
        return list(torch.split(rows, [len(b.occ_rare) for b in batches]))

    def _summed_ce(self, batch: Batch) -> torch.Tensor:
        return self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)

    def train_step(self, step: int) -> StepResult:
        """Train global batch `step`; notes read at the start and written once at the end."""
        t0 = time.perf_counter()
        timer = PhaseTimer()
        indices, keys, epochs = self.sampler.step(step)
        share = [local_share(x, self.world.rank, self.world.size) for x in (indices, keys, epochs)]
        batches = [b.to(self.world.device) for b in self._micro_batches(self.train_set, *share)]
        local_masked = sum(int((b.labels != -100).sum()) for b in batches)
        local_tokens = sum(int(b.lengths.sum()) for b in batches)
        (global_masked,) = all_reduce_sum([local_masked], self.world.device)
        scale = self.world.size * self.grad_accum / max(global_masked, 1.0)
        timer.lap("data")
        rows = self._read_notes(batches) if self.store is not None else [None] * len(batches)
        timer.lap("note_read")

        ce_total, written = 0.0, []
        for batch, batch_rows in zip(batches, rows):
            if self.hooks is not None:
                self.hooks.set_reads(batch.occ_sample, batch.occ_start, batch.occ_end, batch_rows, batch.input_ids.shape[1])
                self.hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
            ce = self._summed_ce(batch)
            timer.lap("forward")
            self.engine.backward(ce * scale)
            timer.lap("backward")
            self.engine.step()
            timer.lap("optimizer")
            ce_total += float(ce.detach())
            if self.hooks is not None:
                written.append((batch.occ_rare, batch.occ_order_key, batch.occ_start, self.hooks.pooled))
                self.hooks.clear()
        notes: dict[str, float] = {}
        if self.store is not None:
            ids, order_keys, starts, pooled = (torch.cat(parts) for parts in zip(*written))
            self.store.write(ids, order_keys, starts, pooled)
            notes = {"occurrences_read": len(ids), "notes_written": len(ids), "distinct_noted": self.store.distinct_noted(),
                     **{f"note_{k}": v for k, v in self.store.take_traffic().items()}}
        timer.lap("note_write")
        ce_sum, tokens, *note_sums = all_reduce_sum([ce_total, local_tokens, *notes.values()], self.world.device)
        notes = dict(zip(notes, note_sums))
        if self.rows_per_rank:
            notes.update(note_rows_max_rank=max(self.rows_per_rank), note_rows_min_rank=min(self.rows_per_rank))
        return StepResult(ce_sum / max(global_masked, 1.0), int(tokens), time.perf_counter() - t0, notes, timer.seconds)

    @torch.no_grad()
    def evaluate(self, with_notes: bool) -> float:
        """Held-out MLM loss over a fixed, masked eval set; with notes it reads (never writes) them."""
        size = min(len(self.eval_set), self.cfg.eval_batches * self.cfg.micro_batch_size)
        mine = [i for i in range(size) if i % self.world.size == self.world.rank]
        batches = [b.to(self.world.device) for b in self._micro_batches(self.eval_set, mine, mine, [EVAL_EPOCH] * len(mine))]
        rows = self._read_notes(batches) if with_notes else [None] * len(batches)
        self.engine.eval()
        ce_total, masked = 0.0, 0
        for batch, batch_rows in zip(batches, rows):
            if with_notes:
                self.hooks.set_reads(batch.occ_sample, batch.occ_start, batch.occ_end, batch_rows, batch.input_ids.shape[1])
            ce_total += float(self._summed_ce(batch))
            masked += int((batch.labels != -100).sum())
            if self.hooks is not None:
                self.hooks.clear()
        self.engine.train()
        if with_notes:
            self.store.take_traffic()  # eval reads are not a training step's traffic
        ce_sum, masked_sum = all_reduce_sum([ce_total, masked], self.world.device)
        return ce_sum / max(masked_sum, 1.0)
