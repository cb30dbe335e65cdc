"""TNF pre-training: `deepspeed tnf_scale/train.py ...` or `python -m tnf_scale.train ...`.

Reads top to bottom as the run: start-up (configuration, process group, run directory, data), the checkpoint to
resume from, the objective and the note store, the training parts (engine, feeder, note I/O, step strategy,
evaluator), then the step loop with metrics, checkpoints and stops, and the export.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import deepspeed
from deepspeed.accelerator import get_accelerator

from tnf_scale.checkpoint import Checkpointer, note_rows
from tnf_scale.config import RunConfig
from tnf_scale.cpu_adam import inner_optimizer
from tnf_scale.distributed import Topology, device_name, wait_for_all
from tnf_scale.errors import PeerStopped, rank_line
from tnf_scale.failures import settle_failure
from tnf_scale.init_from import load_notes, load_weights
from tnf_scale.metrics import MetricsLogger
from tnf_scale.model.build import build_objective, pipeline_refusal
from tnf_scale.model.electra import notes_in_warning
from tnf_scale.model.export import export_hf, save_notes
from tnf_scale.model_flops import ModelRate
from tnf_scale.nonfinite import Diverged, NonfiniteGuard
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.store import NoteStore
from tnf_scale.progress_log import ProgressDisplay
from tnf_scale.run_state import RngStreams, TrainingProgress
from tnf_scale.startup import Started, command, start
from tnf_scale.stopping import StopRequest
from tnf_scale.trainer import StepResult, Training, build_training


def run(cfg: RunConfig) -> int:
    stop = StopRequest()  # from the first moment: a signal during start-up stops at the first step boundary
    started = start(cfg, pipeline_refusal(cfg))
    world, ds_config, run_dir, data, log = started.topo, started.ds_config, started.run, started.data, started.log
    checkpointer = Checkpointer(
        run_dir,
        world,
        data.rare_vocab_path,
        len(data.rare_vocab) if cfg.tnf_enabled else None,
        cfg.save_interval,
        cfg.keep_checkpoints,
    )
    checkpointer.plan(cfg)
    checkpointer.adapt(ds_config)  # a checkpoint this config cannot load is refused before any run file is rewritten

    objective = build_objective(cfg, data.tokenizer)
    store = note_store(cfg, len(data.rare_vocab), objective.model_config.initializer_range, world)
    if started.init:
        load_weights(objective, started.init)
        fresh = store is not None and started.init.run and not load_notes(store, started.init, len(data.rare_vocab))
        log(started.init.describe() + ("; it kept no notes, so they start fresh" if fresh else ""))
    training = build_training(cfg, objective, ds_config, world, data, store)
    log(describe(cfg, started, training))
    warning = notes_in_warning(cfg)
    if warning:
        log(warning)

    progress = TrainingProgress()
    checkpointer.start(
        training.engine,
        {"progress": progress, "rng": RngStreams(on_accelerator(world)), **({"notes": store} if store else {})},
    )
    # the run files are (re)written once the model, the engine and the checkpoint to resume from are known good
    if world.is_main:
        run_dir.write_run_files(
            cfg,
            objective.model_config,
            None if checkpointer.point else data.tokenizer_dir,
            world.size,
            started.run_details(),
            objective.generator_config,
        )
    if checkpointer.point:
        log(
            f"resumed from {checkpointer.point.ckpt} (saved on {checkpointer.point.world_size} ranks) at step "
            f"{progress.step}"
        )
    try:
        return train(cfg, started, training, checkpointer, progress, stop)
    except Diverged:  # every rank decided alike: rank 0 says it once
        if world.is_main:
            raise
        raise PeerStopped(Diverged.exit_status) from None
    except Exception as err:  # every failure is recorded, so that the survivors can name the first
        failed_first, words = settle_failure(
            run_dir, world.rank, world.size, err, lambda: checkpointer.last_complete_step
        )
        if words:
            rank_line(f"rank {world.rank}: stopping after a failure: {words}", sys.stderr)
        if failed_first:
            raise
        return 1
    finally:
        training.feeder.close()


def on_accelerator(world: Topology):
    """DeepSpeed's accelerator when this rank computes on a device other than the CPU, else None."""
    return get_accelerator() if world.device.type != "cpu" else None


def note_store(cfg: RunConfig, num_rare: int, init_std: float, world: Topology) -> NoteStore | None:
    """This rank's share of the note dictionary, on its device (None: a run without notes)."""
    if not cfg.tnf_enabled:
        return None
    exchange = ExchangeGroup(world.note_group_rank, world.note_group_size)
    return NoteStore(num_rare, cfg.hidden_size, cfg.seed, init_std, cfg.note_gamma, exchange, world.device)


def describe(cfg: RunConfig, started: Started, training: Training) -> str:
    """The start-up line: where the run trains and how."""
    world, engine = started.topo, training.engine
    inner = inner_optimizer(training.optimizer)
    note = f" ({started.optimizer_note})" if started.optimizer_note else ""
    micro_note = f" ({started.micro_batch_note})" if started.micro_batch_note else ""
    return (
        f"world {world.size} on {get_accelerator().device_name()} ({world.dims.pipeline} pipeline stages x "
        f"{world.dims.data} data-parallel); micro-batch {cfg.micro_batch_size} x "
        f"{engine.gradient_accumulation_steps()} accumulation steps{micro_note}; "
        f"ZeRO stage {engine.zero_optimization_stage()}; "
        f"optimizer {type(inner).__module__}.{type(inner).__name__}{note}; "
        f"precision {started.precision.describe()}; TNF {cfg.tnf}"
        + ("; encoder layers compiled" if cfg.compile else "")
    )


def train(
    cfg: RunConfig,
    started: Started,
    training: Training,
    checkpointer: Checkpointer,
    progress: TrainingProgress,
    stop: StopRequest,
) -> int:
    """The step loop from `progress` to --max_steps, with metrics, checkpoints, stops and the non-finite guard; then the
    final checkpoint and the export. Returns the exit code."""
    world, run_dir, log = started.topo, started.run, started.log
    engine, trainer, evaluator = training.engine, training.trainer, training.evaluator
    guard = NonfiniteGuard(cfg.max_nonfinite_steps)
    metrics = MetricsLogger(
        run_dir.path,
        world.is_main,
        resumed_step=progress.step if cfg.resume else None,
        wandb_project=cfg.wandb_project,
        settings=dataclasses.asdict(cfg),
    )
    if progress.step == 0:
        metrics.log({"step": 0, **evaluator.metrics()})
    rate = (
        ModelRate.of_run(
            run_dir.path,
            cfg.max_seq_len,
            cfg.mlm_probability,
            device_name(world.device),
            world.size,
            started.run_details()["math"],
        )
        if world.is_main
        else None
    )
    bar = ProgressDisplay(cfg.max_steps, progress.step, "TNF" if cfg.tnf_enabled else "baseline", world.is_main, log)
    clock = time.perf_counter() - progress.wall_time
    record: dict = {}

    for step in range(progress.step, cfg.max_steps):
        if stop.agreed(world.device):  # every rank stops at the same step
            return stop_cleanly(stop, started, checkpointer, progress, guard, metrics, bar)
        result = trainer.train_step(step)
        progress.advance(result.tokens, time.perf_counter() - clock)
        guard.observe(result.loss, engine.get_global_grad_norm())
        last = step + 1 == cfg.max_steps
        record = {}
        if (step + 1) % cfg.log_interval == 0 or last or not guard.healthy:
            record = step_record(progress, result, engine.get_lr()[0], guard, trainer.distinct_noted(), rate)
        if guard.healthy and ((step + 1) % cfg.eval_interval == 0 or last):
            started_eval = time.perf_counter()
            record = {"step": step + 1, **record, **evaluator.metrics()}
            clock += (
                time.perf_counter() - started_eval
            )  # wall_time is training time: TNF's extra eval pass must not count
        if record:
            metrics.log(record)
        guard.stop_if_diverged(step + 1, checkpointer.last_saved)
        bar.step(result.loss, result.tokens / result.seconds, record)
        if guard.healthy:
            checkpointer.save(step + 1)
    bar.close()
    metrics.close()
    if not guard.healthy:  # the last steps were not finite, fewer than the limit: still nothing to save or export
        raise Diverged(
            f"the run ended on {guard.streak} non-finite steps, so its final state was neither saved nor exported; "
            f"the last good checkpoint is step {checkpointer.last_saved} — lower --lr and resume it, or start again."
        )
    if record:
        log("final: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("loss", "eval_loss"))))

    ckpt = checkpointer.save(progress.step, last=True)
    if world.is_main:
        if cfg.export:
            log(f"export (plain Hugging Face model, no notes): {export_hf(run_dir.path, ckpt, run_dir.export)}")
        if cfg.save_notes and cfg.tnf_enabled:
            log(f"notes: {save_notes(run_dir.path, *note_rows(ckpt))}")
        log(f"run: {run_dir.path}\nmetrics: {run_dir.metrics}\nTensorBoard: tensorboard --logdir {run_dir.tensorboard}")
    wait_for_all(world)  # rank 0's export of a large model can outlast NCCL's watchdog
    return 0


def step_record(
    progress: TrainingProgress,
    result: StepResult,
    lr: float,
    guard: NonfiniteGuard,
    distinct_noted: int,
    rate: ModelRate | None,
) -> dict:
    """The metrics record of a logged step (`rate`: rank 0's, for the model FLOPs and MFU; None elsewhere)."""
    tokens_per_s = result.tokens / result.seconds
    return {
        "step": progress.step,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": guard.grad_norm,
        "tokens": progress.tokens,
        "wall_time": progress.wall_time,
        "step_seconds": result.seconds,
        "tokens_per_s": tokens_per_s,
        **(rate.figures(tokens_per_s) if rate else {}),
        "nonfinite_steps": guard.total,
        "memory_max_rank_gib": result.memory_max_rank_gib,
        **result.terms,
        **result.notes,
        "distinct_noted": distinct_noted,
        **{f"time_{phase}": seconds for phase, seconds in result.phases.items()},
    }


def stop_cleanly(
    stop: StopRequest,
    started: Started,
    checkpointer: Checkpointer,
    progress: TrainingProgress,
    guard: NonfiniteGuard,
    metrics: MetricsLogger,
    bar,
) -> int:
    """Every rank agreed to stop at this step: checkpoint it (if its state is finite), say how to continue."""
    run_dir, world, log = started.run, started.topo, started.log
    bar.close()
    metrics.close()
    if guard.healthy:
        checkpointer.save(progress.step, last=True)
    # the batch script requeues on this marker even if srun reports another rank's exit first
    if world.is_main and stop.preempted:
        run_dir.preempted.write_text(f"{progress.step}\n")
    reason = stop.reason or "another rank received a stop signal or lost its launcher"
    log(
        f"{reason}: checkpointed step {checkpointer.last_saved} in {run_dir.path}; exiting with {stop.exit_code}; "
        + (
            "the job is requeued and resumes"
            if stop.preempted
            else "rerun the launch command with --resume true to continue"
        )
    )
    # every rank's own word (the per-node launcher reports only the first exit code it sees)
    rank_line(f"rank {world.rank}: stopped at step {progress.step}, exit {stop.exit_code}", sys.stderr)
    deepspeed.comm.barrier()
    return stop.exit_code


def main(argv: list[str] | None = None) -> int:
    return command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
