"""One TNF training step (read notes -> the engine's forward/backward/step -> write notes), and the build of the
parts that run it: the DeepSpeed engine, the feeder, the note I/O, the step strategy and the evaluator.

The loss of a step is, per loss term of the objective, the mean over every position of the global batch the term
averages over (MLM: the masked tokens), weighted and summed, whatever the split into ranks and micro-batches: each
micro-batch's summed term is scaled by (weight x ranks x accumulation steps / the term's positions in the global
batch), which DeepSpeed's own 1/accumulation and 1/ranks averaging turn back into that mean.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import deepspeed
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (
    PIPELINE_REPLICATED_PARAMETER_PATTERNS,
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from tnf_scale.anatomy import engine_split, install_engine_clock
from tnf_scale.config import RunConfig
from tnf_scale.data.collate import Collator
from tnf_scale.data.prepared import PreparedData
from tnf_scale.distributed import Topology, all_reduce_sum, in_own_slot
from tnf_scale.evaluator import Evaluator
from tnf_scale.feeder import StepFeeder
from tnf_scale.model.compile import compile_encoder_layers
from tnf_scale.model.objective import Objective
from tnf_scale.model.param_groups import parameter_groups
from tnf_scale.model.pipeline import TIED_KEY, PipelineObjective, build_pipeline
from tnf_scale.model.tnf_bert import TnfHooks
from tnf_scale.notes.io import STEP_NOTE_METRICS, NoteIO
from tnf_scale.notes.store import NoteStore
from tnf_scale.step_strategy import DataParallelStep, PipelineStep, StepStrategy
from tnf_scale.timing import PhaseTimer


@dataclass
class StepResult:
    """One step, summed over all data-parallel ranks."""

    loss: float
    terms: dict[
        str, float
    ]  # the objective's step metrics beyond the loss (ELECTRA: each network's loss, replaced share)
    tokens: int
    seconds: float
    notes: dict[str, float]  # occurrences, distinct words noted, note traffic (STEP_NOTE_METRICS at 0 without notes)
    phases: dict[str, float]  # seconds this rank spent in each of anatomy.STEP_PHASES
    memory_max_rank_gib: float  # the largest peak memory allocated so far on any rank (GiB)


class Trainer:
    """Runs training steps: feed, read notes, the strategy's forward/backward/step, write notes, reduce the metrics."""

    def __init__(
        self,
        engine,
        objective: Objective,
        world: Topology,
        feeder: StepFeeder,
        notes: NoteIO | None,
        strategy: StepStrategy,
        profile_phases: bool = False,
    ):
        self.engine, self.objective, self.world = engine, objective, world
        self.feeder, self.notes, self.strategy = feeder, notes, strategy
        self.grad_accum = engine.gradient_accumulation_steps()
        self.counts_data = world.is_first_stage  # the stage that feeds the inputs counts tokens and loss positions
        self.sync = get_accelerator().synchronize if profile_phases else None  # a sync stalls a GPU: only when asked
        self.clock = install_engine_clock(self.sync)

    def distinct_noted(self) -> int:
        """Words noted at least once so far (0 without notes). Collective: every rank calls it at a logged step."""
        return self.notes.distinct_noted() if self.notes is not None else 0

    def train_step(self, step: int) -> StepResult:
        """Train global batch `step`; notes read at the start and written once at the end."""
        t0 = time.perf_counter()
        timer = PhaseTimer(sync=self.sync)
        self.clock.take()  # what the engine did since the last step (an evaluation) is not this step's
        batches = self.feeder.train_batches(step)
        counted = batches if self.counts_data else []
        weights = self.objective.term_weights
        # sizes the collator fixed on the host: counting them reads nothing back from the device
        local_counts = [sum(len(index) for index in term) for term in zip(*map(self.objective.term_index, counted))]
        local_counts = local_counts or [0] * len(weights)
        local_tokens = sum(b.num_tokens for b in counted)
        counts = [max(n, 1.0) for n in all_reduce_sum(local_counts, self.world.device)]
        scales = [weight * self.world.data_parallel_size * self.grad_accum / n for weight, n in zip(weights, counts)]
        timer.lap("data")
        rows = self.notes.read(batches) if self.notes is not None else [None] * len(batches)
        timer.lap("note_read")
        term_totals, pooled = self.strategy.train(batches, rows, scales)
        timer.lap("engine")
        local_notes: dict[str, float] = {}
        if self.notes is not None:
            self.notes.write(batches, pooled)
            local_notes = self.notes.step_counts(counted)
        timer.lap("note_write")
        memory = in_own_slot(  # each rank's peak memory so far
            get_accelerator().max_memory_allocated() / 2**30, self.world.rank, self.world.size
        )
        tokens, *sums = all_reduce_sum([local_tokens, *term_totals, *local_notes.values(), *memory], self.world.device)
        sums, memory = sums[: len(sums) - len(memory)], sums[len(sums) - len(memory) :]
        means = [total / n for total, n in zip(sums[: len(weights)], counts)]
        notes = {**dict.fromkeys(STEP_NOTE_METRICS, 0), **dict(zip(local_notes, sums[len(weights) :]))}
        if self.notes is not None:
            notes.update(self.notes.balance())
        loss = sum(weight * mean for weight, mean in zip(weights, means))
        step_metrics = self.objective.step_metrics(means)
        seconds = time.perf_counter() - t0
        in_engine = timer.seconds.pop("engine")
        phases = {**timer.seconds, **engine_split(in_engine, self.clock.take())}
        return StepResult(loss, step_metrics, int(tokens), seconds, notes, phases, max(memory))


@dataclass
class Training:
    """The parts of a run's training, built once: DeepSpeed's engine and optimizer and what drives them."""

    engine: object
    optimizer: object
    feeder: StepFeeder
    trainer: Trainer
    evaluator: Evaluator


def build_training(
    cfg: RunConfig, objective: Objective, ds_config: dict, world: Topology, data: PreparedData, store: NoteStore | None
) -> Training:
    """The DeepSpeed engine over the objective (data parallel) or over its model as pipeline stages (masked LM only:
    `build.pipeline_refusal`), and the parts that drive it."""
    collator = Collator(
        data.tokenizer, cfg.max_seq_len, cfg.mlm_probability, cfg.seed, cfg.notes_at_masked, cfg.whole_word_masking
    )
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if cfg.compile:  # in place: a pipeline's stages hold the same layers
        compile_encoder_layers(objective)
    if world.dims.pipeline > 1:
        stage_loss = PipelineObjective(cfg.note_window)
        module = build_pipeline(
            objective.mlm, world.dims.pipeline, cfg.note_lambda, stage_loss, cfg.activation_checkpointing
        )
        # the tied embedding module has a copy on the last stage too, whose position and token-type embeddings and
        # LayerNorm are never trained there (only the word embeddings' gradients are tied): the universal conversion
        # takes stage 0's copy of each, where it would otherwise keep whichever stage's it wrote last
        replicated = {PIPELINE_REPLICATED_PARAMETER_PATTERNS: [rf"tied_modules\.{re.escape(TIED_KEY)}\."]}
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, {**universal_info, **replicated})
        engine, optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=parameter_groups(module, cfg.weight_decay), config=ds_config
        )
        check_pipeline_placement(engine, world)
        strategy = PipelineStep(engine, stage_loss, cfg.hidden_size, world.device, take_notes=store is not None)
    else:
        hooks = (
            TnfHooks(objective.note_readers(), objective.note_writer(), cfg.note_lambda, cfg.note_window)
            if store is not None
            else None
        )
        if cfg.activation_checkpointing:
            for network in objective.children():  # the Hugging Face models it wraps
                network.gradient_checkpointing_enable()
        setattr(objective, UNIVERSAL_CHECKPOINT_INFO, universal_info)
        engine, optimizer, _, _ = deepspeed.initialize(
            model=objective, model_parameters=parameter_groups(objective, cfg.weight_decay), config=ds_config
        )
        strategy = DataParallelStep(engine, objective, hooks)
    feeder = StepFeeder(cfg, world, data.train, data.eval, collator, pad_eval=world.dims.pipeline > 1)
    notes = NoteIO(store, world, cfg.hidden_size) if store is not None else None
    return Training(
        engine,
        optimizer,
        feeder,
        Trainer(engine, objective, world, feeder, notes, strategy, cfg.profile_phases),
        Evaluator(feeder, notes, strategy, objective, world.device),
    )


def check_pipeline_placement(engine, world: Topology) -> None:
    """The topology's stage and replica of this rank must be DeepSpeed's (its PipeDataParallelTopology)."""
    grid = engine.grid
    if (grid.data_parallel_id, grid.data_parallel_size, grid.get_stage_id()) != (
        world.data_parallel_rank,
        world.data_parallel_size,
        world.pipeline_parallel_rank,
    ):
        raise RuntimeError(
            f"DeepSpeed placed rank {world.rank} at stage {grid.get_stage_id()}, replica {grid.data_parallel_id}; "
            "Topology assumes pipeline-major order"
        )
