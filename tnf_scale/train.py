"""TNF pre-training: `deepspeed tnf_scale/train.py ...` or `python -m tnf_scale.train ...`.

Reads top to bottom as the run: configuration, start-up (process group, run directory, data), model
with TNF hooks, DeepSpeed engine, (resume,) the step loop with metrics and checkpoints, export.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed
from deepspeed.accelerator import get_accelerator
from tqdm.auto import tqdm

from tnf_scale.checkpoint import Checkpointer
from tnf_scale.config import PeerStopped, RunConfig
from tnf_scale.failures import settle_failure
from tnf_scale.metrics import MetricsLogger
from tnf_scale.model.export import export_hf, save_notes
from tnf_scale.model.build import build_objective, pipeline_refusal
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.nonfinite import Diverged, NonfiniteGuard
from tnf_scale.notes.store import NoteStore
from tnf_scale.startup import Started, command, start
from tnf_scale.stopping import StopRequest
from tnf_scale.trainer import build_trainer

def run(cfg: RunConfig) -> int:
    stop = StopRequest()  # from the first moment: a signal during start-up stops at the first step boundary
    started = start(cfg, pipeline_refusal(cfg))
    world, ds_config, run_dir, data, log = started.topo, started.ds_config, started.run, started.data, started.log
    checkpointer = Checkpointer(run_dir, world, data.rare_vocab_path, len(data.rare_vocab) if cfg.tnf_enabled else None)
    checkpointer.plan(cfg)
    checkpointer.adapt(ds_config)  # a checkpoint this config cannot load is refused before any run file is rewritten

    objective = build_objective(cfg, data.tokenizer)
    if world.is_main:
        run_dir.write_run_files(cfg, objective.model_config, data.tokenizer_dir, world.size, objective.generator_config)
    store = (NoteStore(len(data.rare_vocab), cfg.hidden_size, cfg.seed, objective.model_config.initializer_range, cfg.note_gamma,
                       ExchangeGroup(world.note_group_rank, world.note_group_size), world.device) if cfg.tnf_enabled else None)
    trainer, optimizer = build_trainer(cfg, objective, ds_config, world, data, store)
    engine = trainer.engine
    inner = getattr(optimizer, "optimizer", optimizer)
    log(f"world {world.size} on {get_accelerator().device_name()} ({world.dims.pipeline} pipeline stages x {world.dims.data} data-parallel); "
        f"ZeRO stage {engine.zero_optimization_stage()}; optimizer {type(inner).__module__}.{type(inner).__name__}; "
        f"bf16 {ds_config['bf16']['enabled']}; TNF {cfg.tnf}")

    state = {"step": 0, "tokens": 0, "wall_time": 0.0, "rare_vocab_digest": checkpointer.rare_vocab_digest, "pipeline_stages": world.dims.pipeline,
             "zero_stage": engine.zero_optimization_stage()}
    state = checkpointer.load(engine, store, state)
    if checkpointer.point:
        log(f"resumed from {checkpointer.point.ckpt} (saved on {checkpointer.point.world_size} ranks) at step {state['step']}")
    try:
        return train(cfg, started, trainer, store, checkpointer, state, stop)
    except Diverged:  # every rank decided alike: rank 0 says it once
        if world.is_main:
            raise
        raise PeerStopped(Diverged.exit_status) from None
    except Exception as err:  # noqa: BLE001 - every failure is recorded, so the survivors can name the first
        failed_first, words = settle_failure(run_dir, world.rank, world.size, err, lambda: checkpointer.last_complete_step)
        if words:
            print(f"rank {world.rank}: stopping after a failure: {words}", file=sys.stderr, flush=True)
        if failed_first:
            raise
        return 1
    finally:
        trainer.prefetcher.close()


def train(cfg: RunConfig, started: Started, trainer, store: NoteStore | None, checkpointer: Checkpointer, state: dict, stop: StopRequest) -> int:
    """The step loop from `state` to --max_steps, with metrics, checkpoints, stops and the non-finite guard; then the
    final checkpoint and the export. Returns the exit code."""
    world, run_dir, log = started.topo, started.run, started.log
    engine = trainer.engine
    guard = NonfiniteGuard(cfg.max_nonfinite_steps)
    metrics = MetricsLogger(run_dir.path, world.is_main, resumed_step=state["step"] if cfg.resume else None)
    if state["step"] == 0:
        metrics.log({"step": 0, **trainer.eval_metrics()})
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="TNF" if cfg.tnf_enabled else "baseline", unit="step", disable=not world.is_main)
    clock = time.perf_counter() - state["wall_time"]
    record: dict = {}

    for step in range(state["step"], cfg.max_steps):
        if stop.agreed(world.device):  # every rank stops at the same step
            return stop_cleanly(stop, started, checkpointer, engine, store, state, guard, metrics, bar)
        result = trainer.train_step(step)
        state.update(step=step + 1, tokens=state["tokens"] + result.tokens, wall_time=time.perf_counter() - clock)
        guard.observe(result.loss, engine.get_global_grad_norm())
        record = {}
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps or not guard.healthy:
            record = {"step": step + 1, "loss": result.loss, "lr": engine.get_lr()[0], "tokens": state["tokens"],
                      "wall_time": state["wall_time"], "step_seconds": result.seconds, "tokens_per_s": result.tokens / result.seconds,
                      "nonfinite_steps": guard.total, **result.terms,
                      "occurrences_read": 0, "occurrences_skipped_masked": 0, "notes_written": 0, "distinct_noted": 0, **result.notes,
                      **{f"time_{phase}": seconds for phase, seconds in result.phases.items()}}
        if guard.healthy and ((step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_steps):
            started_eval = time.perf_counter()
            record = {"step": step + 1, **record, **trainer.eval_metrics()}
            clock += time.perf_counter() - started_eval  # wall_time is training time: TNF's extra eval pass must not count
        if record:
            metrics.log(record)
        guard.stop_if_diverged(step + 1, checkpointer.last_saved)
        bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{result.tokens / result.seconds:,.0f}")
        bar.update(1)
        if guard.healthy and cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.max_steps:
            checkpointer.save(engine, store, state)
    bar.close()
    metrics.close()
    if not guard.healthy:  # the last steps were not finite, fewer than the limit: still nothing to save or export
        raise Diverged(f"the run ended on {guard.streak} non-finite steps, so its final state was neither saved nor exported; "
                       f"the last good checkpoint is step {checkpointer.last_saved} — lower --lr and resume it, or start again.")
    if record:
        log("final: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("loss", "eval_loss"))))

    ckpt = checkpointer.final(engine, store, state)
    if world.is_main:
        if cfg.export:
            log(f"export (plain Hugging Face model, no notes): {export_hf(run_dir.path, ckpt, run_dir.export)}")
        if cfg.save_notes and store is not None:
            log(f"notes: {save_notes(run_dir.path, *checkpointer.note_rows(ckpt))}")
        log(f"run: {run_dir.path}\nmetrics: {run_dir.metrics}\nTensorBoard: tensorboard --logdir {run_dir.tensorboard}")
    deepspeed.comm.barrier()
    return 0


def stop_cleanly(stop: StopRequest, started: Started, checkpointer: Checkpointer, engine, store, state: dict,
                 guard: NonfiniteGuard, metrics: MetricsLogger, bar) -> int:
    """Every rank agreed to stop at this step: checkpoint it (unless its state is not finite) and say how to continue."""
    run_dir, world, log = started.run, started.topo, started.log
    bar.close()
    metrics.close()
    if guard.healthy:
        checkpointer.save(engine, store, state)
    if world.is_main and stop.preempted:  # the batch script requeues on this marker even if srun reports another rank's exit first
        run_dir.preempted.write_text(f"{state['step']}\n")
    reason = stop.reason or "another rank received a stop signal or lost its launcher"
    log(f"{reason}: checkpointed step {checkpointer.last_saved} in {run_dir.path}; exiting with {stop.exit_code}; "
        f"{'the job is requeued and resumes' if stop.preempted else 'rerun the launch command with --resume true to continue'}")
    deepspeed.comm.barrier()
    return stop.exit_code


def main(argv: list[str] | None = None) -> int:
    return command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
