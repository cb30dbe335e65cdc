"""One TNF training step (read notes -> DeepSpeed forward/backward/step -> write notes), and evaluation.

The loss of a step is, per loss term of the objective, the mean over every position of the global batch the term
averages over (MLM: the masked tokens), weighted and summed, whatever the split into ranks and micro-batches: each
micro-batch's summed term is scaled by (weight x ranks x accumulation steps / the term's positions in the global
batch), which DeepSpeed's own 1/accumulation and 1/ranks averaging turn back into that mean.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

from tnf_scale.config import ConfigError, RunConfig
from tnf_scale.data.prefetch import StepPrefetcher
from tnf_scale.data.prepare import PreparedData
from tnf_scale.data.sampler import EVAL_EPOCH, Batch, Collator, GlobalBatchSampler, local_share
from tnf_scale.distributed import Topology, all_reduce_sum
from tnf_scale.model.objective import LossSums, Objective
from tnf_scale.model.pipeline import PipelineObjective, build_pipeline
from tnf_scale.model.tnf_bert import TnfHooks
from tnf_scale.notes.store import NoteStore
from tnf_scale.spans import expand_spans


@dataclass
class StepResult:
    """One step, summed over all data-parallel ranks."""

    loss: float
    terms: dict[str, float]  # the objective's step metrics beyond the loss (ELECTRA: each network's loss, replaced share)
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


class Trainer:
    """Runs steps and evaluations of one DeepSpeed engine (data parallel), with or without notes.

    Roles: every rank here holds data, reads notes for it and writes its notes. The pipeline
    subclass narrows them (first stage reads, last stage writes) and runs DeepSpeed's schedule.
    """

    def __init__(self, cfg: RunConfig, engine, world: Topology, train_set, eval_set, collator: Collator, objective: Objective,
                 hooks: TnfHooks | None, store: NoteStore | None):
        self.cfg, self.engine, self.world, self.objective = cfg, engine, world, objective
        self.train_set, self.eval_set, self.collator = train_set, eval_set, collator
        self.hooks, self.store = hooks, store
        self.sampler = GlobalBatchSampler(len(train_set), cfg.global_batch_size, cfg.seed)
        on_accelerator = world.device.type != "cpu"
        ahead = cfg.prefetch == "on" or (cfg.prefetch == "auto" and on_accelerator)
        # page-locked batches reach an accelerator without blocking the step
        self.prefetcher = StepPrefetcher(self._train_batches, ahead=ahead, pin=ahead and on_accelerator)
        self.grad_accum = engine.gradient_accumulation_steps()
        self.data_rank, self.data_size = world.data_parallel_rank, world.data_parallel_size  # samples split over the data-parallel group
        self.reads_notes = self.writes_notes = self.counts_data = True
        self.rows_per_rank: list[int] = []
        if store is not None:  # rows held by each rank of the note group
            one_hot = [0.0] * world.note_group_size
            one_hot[world.note_group_rank] = len(store.ids)
            self.rows_per_rank = [int(n) for n in all_reduce_sum(one_hot, world.device)]

    def _micro_batches(self, dataset, indices: list[int], keys: list[int], epochs: list[int]) -> list[Batch]:
        """Collated micro-batches, on the host (the step moves them to the device)."""
        mb = self.cfg.micro_batch_size
        return [self.collator(dataset, indices[i : i + mb], keys[i : i + mb], epochs[i : i + mb]) for i in range(0, len(indices), mb)]

    def _train_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global batch `step`."""
        indices, keys, epochs = self.sampler.step(step)
        return self._micro_batches(self.train_set, *(local_share(x, self.data_rank, self.data_size) for x in (indices, keys, epochs)))

    def _to_device(self, batches: list[Batch], non_blocking: bool = False) -> list[Batch]:
        return [batch.to(self.world.device, non_blocking=non_blocking) for batch in batches]

    def _read_notes(self, batches: list[Batch]) -> list[torch.Tensor]:
        """One read for the reading occurrences (`Batch.read_spans`) this rank feeds into the model in the step,
        split per micro-batch.

        Every rank takes part; a rank that feeds no inputs asks for nothing and gets empty rows.
        """
        counts = [int(b.occ_reads.sum()) for b in batches]
        ids = torch.cat([b.read_spans[0] for b in batches]) if self.reads_notes else torch.zeros(0, dtype=torch.int64)
        rows = self.store.read(ids)
        if not self.reads_notes:
            return [rows.new_zeros(n, rows.shape[1]) for n in counts]
        return list(torch.split(rows, counts))

    def _write_notes(self, batches: list[Batch], pooled: list[torch.Tensor]) -> None:
        """One write of every note this rank took in the step (none when it does not take notes)."""
        if self.writes_notes:
            parts = [torch.cat(x) for x in zip(*((b.occ_rare, b.occ_order_key, b.occ_start) for b in batches))]
            notes = torch.cat(pooled)
        else:
            parts = [torch.zeros(0, dtype=torch.int64, device=self.world.device)] * 3
            notes = torch.zeros(0, self.cfg.hidden_size, device=self.world.device)
        self.store.write(*parts, notes)

    def _term_losses(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Per loss term, the loss of every position it averages over (row-major order)."""
        return self.engine(**self.objective.inputs(batch))

    def _set_reads(self, batch: Batch, rows: torch.Tensor) -> None:
        self.hooks.set_reads(*batch.read_spans[1:], rows, batch.input_ids.shape[1])

    def _train_micro_batches(self, batches: list[Batch], rows: list, scales: list[float], timer: PhaseTimer) -> tuple[list[float], list]:
        """Forward, backward and step over the micro-batches; returns (each term's summed loss, pooled notes per micro-batch)."""
        totals, pooled = [0.0] * len(scales), []
        for batch, batch_rows in zip(batches, rows):
            if self.hooks is not None:
                self._set_reads(batch, batch_rows)
                self.hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
            sums = [term.sum() for term in self._term_losses(batch)]
            timer.lap("forward")
            self.engine.backward(sum(term * scale for term, scale in zip(sums, scales) if scale))
            timer.lap("backward")
            self.engine.step()
            timer.lap("optimizer")
            totals = [total + float(term.detach()) for total, term in zip(totals, sums)]
            if self.hooks is not None:
                pooled.append(self.hooks.pooled)
                self.hooks.clear()
        return totals, pooled

    def _eval_micro_batches(self, batches: list[Batch], rows: list) -> list[LossSums]:
        """Each term's losses of a forward over the micro-batches, notes mixed in (leak-free) when rows are given."""
        sums = [LossSums() for _ in self.objective.term_weights]
        for batch, batch_rows in zip(batches, rows):
            if batch_rows is not None:
                self._set_reads(batch, batch_rows)
            for term_sums, losses, positions in zip(sums, self._term_losses(batch), self.objective.term_positions(batch)):
                term_sums.add(losses, batch.in_rare_span[positions])
            if self.hooks is not None:
                self.hooks.clear()
        return sums

    def train_step(self, step: int) -> StepResult:
        """Train global batch `step`; notes read at the start and written once at the end."""
        t0 = time.perf_counter()
        timer = PhaseTimer()
        # With prefetching, collated (and page-locked on an accelerator) while the previous step ran; `data` times the wait.
        batches = self._to_device(self.prefetcher.get(step), non_blocking=self.prefetcher.pin)
        counted = batches if self.counts_data else []
        weights = self.objective.term_weights
        local_counts = [0] * len(weights)
        for batch in counted:
            local_counts = [n + int(positions.sum()) for n, positions in zip(local_counts, self.objective.term_positions(batch))]
        local_tokens = sum(int(b.lengths.sum()) for b in counted)
        counts = [max(n, 1.0) for n in all_reduce_sum(local_counts, self.world.device)]
        scales = [weight * self.data_size * self.grad_accum / n for weight, n in zip(weights, counts)]
        timer.lap("data")
        rows = self._read_notes(batches) if self.store is not None else [None] * len(batches)
        timer.lap("note_read")
        term_totals, pooled = self._train_micro_batches(batches, rows, scales, timer)
        notes: dict[str, float] = {}
        if self.store is not None:
            self._write_notes(batches, pooled)
            occurrences = sum(len(b.occ_rare) for b in counted)
            read = sum(int(b.occ_reads.sum()) for b in counted)
            notes = {"occurrences_read": read, "occurrences_skipped_masked": occurrences - read, "notes_written": occurrences,
                     "distinct_noted": self.store.distinct_noted(), **{f"note_{k}": v for k, v in self.store.take_traffic().items()}}
        timer.lap("note_write")
        tokens, *sums = all_reduce_sum([local_tokens, *term_totals, *notes.values()], self.world.device)
        means = [total / n for total, n in zip(sums[: len(weights)], counts)]
        notes = dict(zip(notes, sums[len(weights):]))
        if self.rows_per_rank:
            notes.update(note_rows_max_rank=max(self.rows_per_rank), note_rows_min_rank=min(self.rows_per_rank))
        loss = sum(weight * mean for weight, mean in zip(weights, means))
        return StepResult(loss, self.objective.step_metrics(means), int(tokens), time.perf_counter() - t0, notes, timer.seconds)

    def _eval_batches(self) -> list[Batch]:
        """This rank's share of the held-out set: its first --eval_sequences sequences, whatever the ranks and stages."""
        size = min(len(self.eval_set), self.cfg.eval_sequences)
        if size < self.data_size:
            raise ConfigError(f"--eval_sequences {size} (the held-out set's size, if smaller) is fewer than the {self.data_size} "
                              "data-parallel replicas; pass at least one sequence per replica.")
        mine = local_share(list(range(size)), self.data_rank, self.data_size)
        return self._to_device(self._micro_batches(self.eval_set, mine, mine, [EVAL_EPOCH] * len(mine)))

    @torch.no_grad()
    def evaluate(self, with_notes: bool) -> list[LossSums]:
        """Each term's held-out losses over a fixed, masked eval set (`_eval_batches`), summed over ranks; with notes it
        reads (never writes) them, under the same leak-free rule as training."""
        batches = self._eval_batches()
        rows = self._read_notes(batches) if with_notes else [None] * len(batches)
        self.engine.eval()
        sums = self._eval_micro_batches(batches, rows)
        self.engine.train()
        if with_notes:
            self.store.take_traffic()  # eval reads are not a training step's traffic
        flat = all_reduce_sum([x for term in sums for x in term.as_list()], self.world.device)
        width = len(LossSums().as_list())
        return [LossSums(*flat[i : i + width]) for i in range(0, len(flat), width)]

    def eval_metrics(self) -> dict[str, float]:
        """The objective's held-out metrics: the model as it will be exported, and with notes (leak-free) for TNF runs."""
        return self.objective.eval_metrics(self.evaluate(with_notes=False), self.evaluate(with_notes=True) if self.store is not None else None)


class PipelineTrainer(Trainer):
    """TNF over DeepSpeed's pipeline schedule: reads travel into the first stage with each micro-batch,
    the last stage's loss function pools the notes, one exchange before and one after the schedule."""

    def __init__(self, cfg: RunConfig, engine, world: Topology, train_set, eval_set, collator: Collator, objective: Objective,
                 store: NoteStore | None, stage_loss: PipelineObjective):
        super().__init__(cfg, engine, world, train_set, eval_set, collator, objective, None, store)
        self.stage_loss = stage_loss
        grid = engine.grid
        if (grid.data_parallel_id, grid.data_parallel_size, grid.get_stage_id()) != (
                world.data_parallel_rank, world.data_parallel_size, world.pipeline_parallel_rank):
            raise RuntimeError(f"DeepSpeed placed rank {world.rank} at stage {grid.get_stage_id()}, replica {grid.data_parallel_id}; "
                               "Topology assumes pipeline-major order")
        self.reads_notes, self.writes_notes = engine.is_first_stage(), engine.is_last_stage()
        self.counts_data = engine.is_first_stage()

    def _eval_batches(self) -> list[Batch]:
        """As for data parallelism, with a short last micro-batch padded: the schedule needs equal micro-batches."""
        return [batch.padded(self.cfg.micro_batch_size) for batch in super()._eval_batches()]

    def _pipeline_items(self, batches: list[Batch], rows: list):
        for batch, batch_rows in zip(batches, rows):
            if batch_rows is None:  # no notes: an empty mix
                batch_rows = torch.zeros(0, self.cfg.hidden_size, device=self.world.device)
                token_index = token_occ = torch.zeros(0, dtype=torch.int64, device=self.world.device)
            else:
                token_index, token_occ = expand_spans(*batch.read_spans[1:], batch.input_ids.shape[1])
            yield ((batch.input_ids, batch.attention_mask, token_index, token_occ, batch_rows),
                   (batch.labels, batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths, batch.in_rare_span))

    def _train_micro_batches(self, batches: list[Batch], rows: list, scales: list[float], timer: PhaseTimer) -> tuple[list[float], list]:
        self.stage_loss.reset()
        (self.stage_loss.scale,), self.stage_loss.take_notes = scales, self.store is not None  # MLM: one term
        self.engine.train_batch(iter(self._pipeline_items(batches, rows)))
        timer.lap("forward")  # the schedule interleaves forward, backward and the step: all counted here
        return [self.stage_loss.sums.ce], self.stage_loss.pooled

    def _eval_micro_batches(self, batches: list[Batch], rows: list) -> list[LossSums]:
        self.stage_loss.reset()
        self.stage_loss.scale, self.stage_loss.take_notes = 1.0, False
        self.engine.eval_batch(iter(self._pipeline_items(batches, rows)), num_micro_batches=len(batches))
        return [self.stage_loss.sums]


def build_trainer(cfg: RunConfig, objective: Objective, ds_config: dict, world: Topology, data: PreparedData,
                  store: NoteStore | None) -> tuple[Trainer, object]:
    """The DeepSpeed engine over the objective (data parallel) or over its model as pipeline stages (masked LM only:
    `build.pipeline_refusal`), and the trainer that drives it; also returns the optimizer DeepSpeed built."""
    collator = Collator(data.tokenizer, cfg.max_seq_len, cfg.mlm_probability, cfg.seed, cfg.notes_at_masked)
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if world.dims.pipeline > 1:
        stage_loss = PipelineObjective(cfg.note_window)
        module = build_pipeline(objective.mlm, world.dims.pipeline, cfg.note_lambda, stage_loss, cfg.activation_checkpointing)
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, universal_info)
        engine, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                                       config=ds_config)
        return PipelineTrainer(cfg, engine, world, data.train, data.eval, collator, objective, store, stage_loss), optimizer
    hooks = TnfHooks(objective.note_readers(), objective.note_writer(), cfg.note_lambda, cfg.note_window) if cfg.tnf_enabled else None
    if cfg.activation_checkpointing:
        for network in objective.children():  # the Hugging Face models it wraps
            network.gradient_checkpointing_enable()
    setattr(objective, UNIVERSAL_CHECKPOINT_INFO, universal_info)
    engine, optimizer, _, _ = deepspeed.initialize(model=objective, model_parameters=objective.parameters(), config=ds_config)
    return Trainer(cfg, engine, world, data.train, data.eval, collator, objective, hooks, store), optimizer
