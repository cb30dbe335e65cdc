"""TNF pre-training: `deepspeed tnf_scale/train.py ...` or `python -m tnf_scale.train ...`.

Reads top to bottom as the run: configuration, process group, data, model with TNF hooks,
DeepSpeed engine, (resume,) the step loop with metrics and checkpoints, export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from tqdm.auto import tqdm

from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

from tnf_scale.checkpoint import latest_complete, load_engine, plan_resume, read_rank_files, save_checkpoint, universal_checkpoint
from tnf_scale.config import ConfigError, RunConfig, exit_code, parse_args
from tnf_scale.data.prepare import RARE_VOCAB_FILE, PreparedData, prepare_data
from tnf_scale.data.sampler import Collator
from tnf_scale.distributed import World, any_rank, check_master_port, discover, init_distributed
from tnf_scale.ds_config import ParallelDims, build_ds_config
from tnf_scale.trainer import PipelineTrainer, Trainer
from tnf_scale.metrics import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger
from tnf_scale.model.export import MODEL_CONFIG, copy_tokenizer, export_hf, save_notes
from tnf_scale.model.pipeline import PipelineObjective, build_pipeline
from tnf_scale.model.tnf_bert import MaskedLMObjective, TnfHooks, build_bert
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.store import NoteStore
from tnf_scale.provenance import write_provenance

RUN_ARTIFACTS = (METRICS_FILE, TENSORBOARD_DIR, "checkpoints", "export", "notes.safetensors")
WORLD_SOURCES = {"slurm": " in the SLURM allocation (SLURM_NTASKS)", "mpi": " started by MPI"}
PREEMPTED_EXIT = 85  # checkpointed on SIGUSR1: the batch script requeues the job
PREEMPTED_MARKER = "PREEMPTED"


class PreemptionSignal:
    """Remembers a SIGUSR1 (SLURM's --signal=USR1@secs before a time limit or pre-emption)."""

    def __init__(self):
        self.raised = False
        signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True


def check_output_dir(cfg: RunConfig, world: World) -> Path:
    """Refuse to mix a new run into an old one unless --resume or --overwrite says what to do."""
    out = Path(cfg.output_dir)
    existing = [name for name in RUN_ARTIFACTS if (out / name).exists()]
    if existing and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"--output_dir {out} already holds a run ({existing[0]}); pass --resume to continue it, --overwrite to replace it, or choose another directory.")
    deepspeed.comm.barrier()  # every rank has looked before rank 0 deletes anything
    if world.is_main:
        if cfg.overwrite and not cfg.resume:
            for name in existing:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
        out.mkdir(parents=True, exist_ok=True)
    deepspeed.comm.barrier()
    return out


def prepare_on_local_rank0(cfg: RunConfig, world: World, log) -> PreparedData:
    """Local rank 0 of each node prepares (or finds) the data; the other ranks then load it."""
    if world.local_rank == 0:
        data = prepare_data(cfg, log=log, show_progress=world.is_main)
    deepspeed.comm.barrier()
    if world.local_rank != 0:
        data = prepare_data(cfg, log=lambda *_: None, show_progress=False)
    return data


def write_run_files(out: Path, cfg: RunConfig, model, data: PreparedData, world: World) -> None:
    """The files that describe a run beside its metrics: tokenizer, model config, run config, provenance."""
    write_provenance(out, world.size)
    copy_tokenizer(data.tokenizer_dir, out)
    model.config.to_json_file(str(out / MODEL_CONFIG))
    (out / "run_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_trainer(cfg: RunConfig, model, ds_config: dict, dims: ParallelDims, world: World, data: PreparedData,
                 store: NoteStore | None) -> tuple[Trainer, object]:
    """The DeepSpeed engine over `model` (data parallel, or pipeline stages) and the trainer that drives it."""
    collator = Collator(data.tokenizer, cfg.max_seq_len, cfg.mlm_probability, cfg.seed, cfg.notes_at_masked)
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    if dims.pipeline > 1:
        objective = PipelineObjective(cfg.note_window)
        module = build_pipeline(model, dims.pipeline, cfg.note_lambda, objective, cfg.activation_checkpointing)
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, universal_info)
        engine, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters() if p.requires_grad],
                                                       config=ds_config)
        return PipelineTrainer(cfg, engine, world, data.train, data.eval, collator, store, objective), optimizer
    hooks = TnfHooks(model, cfg.note_lambda, cfg.note_window) if cfg.tnf_enabled else None
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    objective = MaskedLMObjective(model)
    setattr(objective, UNIVERSAL_CHECKPOINT_INFO, universal_info)
    engine, optimizer, _, _ = deepspeed.initialize(model=objective, model_parameters=objective.parameters(), config=ds_config)
    return Trainer(cfg, engine, world, data.train, data.eval, collator, hooks, store), optimizer


def run(cfg: RunConfig) -> int:
    accelerator = get_accelerator()
    info = discover()
    # Parallel degrees and the master port are checked before any process group exists.
    ds_config, dims = build_ds_config(cfg, info.world_size, accelerator.device_name() != "cpu" and accelerator.is_bf16_supported(),
                                      WORLD_SOURCES.get(info.source, ""))
    check_master_port(info)
    world = init_distributed(info)
    print(info.describe(), flush=True)  # one line per rank
    log = print if world.is_main else (lambda *_: None)
    preemption = PreemptionSignal()
    out = check_output_dir(cfg, world)
    data = prepare_on_local_rank0(cfg, world, log)
    rare_digest = digest(data.tokenizer_dir / RARE_VOCAB_FILE)
    point = plan_resume(out, rare_digest, len(data.rare_vocab) if cfg.tnf_enabled else None) if cfg.resume else None

    model = build_bert(cfg, data.tokenizer)
    if world.is_main:
        write_run_files(out, cfg, model, data, world)
    store = (NoteStore(len(data.rare_vocab), cfg.hidden_size, cfg.seed, model.config.initializer_range, cfg.note_gamma,
                       ExchangeGroup(world.rank, world.size), world.device) if cfg.tnf_enabled else None)

    source = point.ckpt if point else None
    if point and (point.marker.get("pipeline_stages", 1), point.world_size) != (dims.pipeline, world.size):
        if dims.pipeline > 1 or point.marker.get("pipeline_stages", 1) > 1:
            raise ConfigError(f"checkpoint {point.ckpt} was saved with {point.marker.get('pipeline_stages', 1)} pipeline stages on "
                              f"{point.world_size} ranks; resume a pipeline run with the same stages and ranks.")
        if ds_config["zero_optimization"].get("stage", 0) > 0:
            source = universal_checkpoint(point, world.rank)  # ZeRO state saved on another number of ranks
            ds_config["checkpoint"] = {"load_universal": True}
    trainer, optimizer = build_trainer(cfg, model, ds_config, dims, world, data, store)
    engine = trainer.engine
    inner = getattr(optimizer, "optimizer", optimizer)
    log(f"world {world.size} on {accelerator.device_name()} ({dims.pipeline} pipeline stages x {dims.data} data-parallel); "
        f"ZeRO stage {engine.zero_optimization_stage()}; optimizer {type(inner).__module__}.{type(inner).__name__}; "
        f"bf16 {ds_config['bf16']['enabled']}; TNF {cfg.tnf}")

    state = {"step": 0, "tokens": 0, "wall_time": 0.0, "rare_vocab_digest": rare_digest, "pipeline_stages": dims.pipeline}
    if point:
        load_engine(engine, point, source, world.rank)
        if store is not None:
            store.load_rows(point.rank_files)
        state = {**state, **{key: point.marker[key] for key in ("step", "tokens", "wall_time")}}
        log(f"resumed from {point.ckpt} (saved on {point.world_size} ranks) at step {state['step']}")

    metrics = MetricsLogger(out, world.is_main, resumed_step=state["step"] if cfg.resume else None)
    if state["step"] == 0:
        metrics.log({"step": 0, **evaluate(trainer, cfg)})
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="TNF" if cfg.tnf_enabled else "baseline", unit="step", disable=not world.is_main)
    clock = time.perf_counter() - state["wall_time"]
    last_saved = state["step"]
    record: dict = {}

    def checkpoint(step_reached: int) -> Path:
        return save_checkpoint(engine, out, step_reached, world.rank, world.size, store.state() if store else None, state)

    for step in range(state["step"], cfg.max_steps):
        if any_rank(preemption.raised, world.device):  # every rank stops at the same step
            bar.close()
            metrics.close()
            checkpoint(step)
            if world.is_main:  # the batch script requeues on this marker even if srun reports another rank's exit first
                (out / PREEMPTED_MARKER).write_text(f"{step}\n")
            log(f"SIGUSR1: checkpointed step {step} in {out}; exiting with {PREEMPTED_EXIT} so the job is requeued and resumes")
            deepspeed.comm.barrier()
            return PREEMPTED_EXIT
        result = trainer.train_step(step)
        state.update(step=step + 1, tokens=state["tokens"] + result.tokens, wall_time=time.perf_counter() - clock)
        record = {}
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_steps:
            record = {"step": step + 1, "loss": result.loss, "lr": engine.get_lr()[0], "tokens": state["tokens"],
                      "wall_time": state["wall_time"], "step_seconds": result.seconds, "tokens_per_s": result.tokens / result.seconds,
                      "occurrences_read": 0, "occurrences_skipped_masked": 0, "notes_written": 0, "distinct_noted": 0, **result.notes,
                      **{f"time_{phase}": seconds for phase, seconds in result.phases.items()}}
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == cfg.max_steps:
            started = time.perf_counter()
            record = {"step": step + 1, **record, **evaluate(trainer, cfg)}
            clock += time.perf_counter() - started  # wall_time is training time: TNF's extra eval pass must not count
        if record:
            metrics.log(record)
        bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{result.tokens / result.seconds:,.0f}")
        bar.update(1)
        if cfg.save_interval and (step + 1) % cfg.save_interval == 0 and step + 1 < cfg.max_steps:
            checkpoint(step + 1)
            last_saved = step + 1
    bar.close()
    metrics.close()
    if record:
        log("final: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("loss", "eval_loss"))))

    if last_saved != state["step"] or latest_complete(out) is None:
        ckpt = checkpoint(state["step"])
    else:
        ckpt = latest_complete(out)
    if world.is_main:
        if cfg.export:
            log(f"export (Hugging Face BertForMaskedLM, no notes): {export_hf(out, ckpt, out / 'export')}")
        if cfg.save_notes and store is not None:
            rows = read_rank_files(ckpt, world.size)
            log(f"notes: {save_notes(out, torch.cat([r['ids'] for r in rows]), torch.cat([r['vectors'] for r in rows]))}")
        log(f"run: {out}\nmetrics: {out / METRICS_FILE}\nTensorBoard: tensorboard --logdir {out / TENSORBOARD_DIR}")
    deepspeed.comm.barrier()
    return 0


def evaluate(trainer: Trainer, cfg: RunConfig) -> dict[str, float]:
    """Held-out loss of the model as it will be exported, and with notes (leak-free) for TNF runs; each also over
    the predicted tokens inside rare spans (`_rare`) and the others (`_other`), with the two token counts."""
    plain = trainer.evaluate(with_notes=False)
    result = {**plain.losses("eval_loss_no_notes"), "eval_tokens_rare": int(plain.tokens_rare), "eval_tokens_other": int(plain.tokens_other)}
    if cfg.tnf_enabled:
        result.update(trainer.evaluate(with_notes=True).losses("eval_loss_notes"))
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: a bad input ends in one line on stderr and exit code 2."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return exit_code(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
