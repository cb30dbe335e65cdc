"""tnf_scale's masked LM and stock BertForMaskedLM (the Hugging Face Trainer peer's model), stepped side by side in
one process: both built by `build_bert` (the same weights), both wrapped in a DeepSpeed engine from the DeepSpeed
config train.py builds for the same flags, both fed the same micro-batches of the prepared corpus, in trials of
alternating order (A B, B A, ...). Each step is split by the engine clock (tnf_scale/anatomy.py) into forward,
backward, accumulation, the boundary reduction and the optimizer; what is left (loss sums, the loop) is `rest`.

This is the reference the throughput report's end-to-end ratio is checked against: the two models, without either
trainer's loop around them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import deepspeed
from deepspeed.accelerator import get_accelerator

from tnf_scale.anatomy import ENGINE_PHASES, install_engine_clock
from tnf_scale.config import RunConfig
from tnf_scale.data.batch import Batch
from tnf_scale.data.collate import Collator
from tnf_scale.data.prepared import prepare_data
from tnf_scale.distributed import init_distributed
from tnf_scale.feeder import StepFeeder
from tnf_scale.model.objective import MaskedLMObjective
from tnf_scale.model.param_groups import parameter_groups
from tnf_scale.model.tnf_bert import build_bert
from tnf_scale.reports.bench import trial_plan
from tnf_scale.reports.throughput import phase_anatomy, phase_cell, spread
from tnf_scale.startup import launch_plan
from tnf_scale.step_strategy import DataParallelStep
from tnf_scale.threads import set_intra_op_threads

MODELS = ("tnf_scale", "stock")


def engine_of(module, cfg: RunConfig, ds_config: dict):
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=parameter_groups(module, cfg.weight_decay), config=ds_config
    )
    return engine


def tnf_scale_step(engine, objective: MaskedLMObjective) -> Callable[[list[Batch]], None]:
    """One optimizer step through train.py's data-parallel step strategy, without notes: the loss summed over the
    masked tokens, scaled to their mean over the step."""
    strategy = DataParallelStep(engine, objective, hooks=None)

    def step(batches: list[Batch]) -> None:
        scale = engine.gradient_accumulation_steps() / max(sum(b.num_predicted for b in batches), 1)
        strategy.train(batches, [None] * len(batches), [scale])

    return step


def stock_step(engine) -> Callable[[list[Batch]], None]:
    """One optimizer step as the Hugging Face Trainer takes it under DeepSpeed: the model's own loss (the mean over
    each micro-batch's masked tokens), with the full attention mask the peer's collator hands it."""

    def step(batches: list[Batch]) -> None:
        for batch in batches:
            output = engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            engine.backward(output.loss)
            engine.step()

    return step


def summary(records: list[dict]) -> dict:
    """Median and spread of the step's seconds and tokens/s, and the anatomy (phase_anatomy)."""
    return {
        "steps": len(records),
        "step_seconds": spread([r["seconds"] for r in records]),
        "tokens_per_s": spread([r["tokens"] / r["seconds"] for r in records]),
        **phase_anatomy([r["seconds"] for r in records], {p: [r[p] for r in records] for p in ENGINE_PHASES}),
    }


def measure(cfg: RunConfig, trials: int, steps: int, log=print) -> dict:
    """Interleaved trials of `steps` optimizer steps of each model (after one warm-up step each); each model's
    summary and the ratio of its tokens/s to the stock model's, overall and trial by trial."""
    info, ds_config, dims, precision, fused_adam, _ = launch_plan(cfg)
    threads = set_intra_op_threads(cfg.intra_op_threads, info.local_size)
    world = init_distributed(info, dims)
    data = prepare_data(cfg, log, False)
    feeder = StepFeeder(
        cfg, world, data.train, data.eval, Collator(data.tokenizer, cfg.max_seq_len, cfg.mlm_probability, cfg.seed)
    )
    objective = MaskedLMObjective(build_bert(cfg, data.tokenizer))
    steppers = {
        "tnf_scale": tnf_scale_step(engine_of(objective, cfg, ds_config), objective),
        "stock": stock_step(engine_of(build_bert(cfg, data.tokenizer), cfg, ds_config)),
    }
    sync = get_accelerator().synchronize  # a measurement: every phase holds its device time
    clock = install_engine_clock(sync)
    for stepper in steppers.values():  # warm-up: first-call allocations and kernel choices
        stepper(feeder.train_batches(0))
    records: dict[str, list[list[dict]]] = {name: [[] for _ in range(trials)] for name in MODELS}
    for trial, name in trial_plan(list(MODELS), trials):
        for i in range(steps):
            batches = feeder.train_batches(1 + trial * steps + i)  # both models see the same batches
            sync()
            clock.take()
            start = time.perf_counter()
            steppers[name](batches)
            sync()
            seconds = time.perf_counter() - start
            records[name][trial].append(
                {"seconds": seconds, "tokens": sum(b.num_tokens for b in batches), **clock.take()}
            )
        median = statistics.median(r["seconds"] for r in records[name][trial])
        log(f"trial {trial + 1}, {name}: median step {median:.2f} s")
    feeder.close()
    models = {name: summary([r for trial in per_trial for r in trial]) for name, per_trial in records.items()}
    trial_ratios = [
        statistics.median(r["seconds"] for r in stock) / statistics.median(r["seconds"] for r in ours)
        for ours, stock in zip(records["tnf_scale"], records["stock"])
    ]
    return {
        "preset": cfg.preset,
        "precision": precision.describe(),
        "threads": threads,
        "optimizer": fused_adam[1],
        "global_batch_size": cfg.global_batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "accumulation_steps": ds_config["gradient_accumulation_steps"],
        "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
        "trials": trials,
        "steps_per_trial": steps,
        "models": models,
        "tnf_scale_over_stock": {
            "median": models["tnf_scale"]["tokens_per_s"]["median"] / models["stock"]["tokens_per_s"]["median"],
            "min": min(trial_ratios),
            "max": max(trial_ratios),
            "trials": trial_ratios,
        },
    }


def render(result: dict, machine: str, command: str) -> str:
    """The anatomy as markdown: one column per model, each phase's mean with its share of the step."""
    models = result["models"]

    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(models[m]) for m in MODELS) + " |"

    ratio = result["tnf_scale_over_stock"]
    lines = [
        f"Step anatomy, preset {result['preset']}, {result['precision']}, {result['global_batch_size']} sequences per "
        f"step (micro-batch {result['micro_batch_size']} x {result['accumulation_steps']}), ZeRO stage "
        f"{result['zero_stage']}, {result['optimizer']}; {result['trials']} trials of {result['steps_per_trial']} "
        f"steps per model, in turn; {result['threads']}; on {machine}; `{command}`.",
        "",
        "| | tnf_scale's masked LM | stock BertForMaskedLM |",
        "| --- | --- | --- |",
        row(
            "step (median, min..max)",
            lambda m: (
                f"{m['step_seconds']['median']:.2f} s ({m['step_seconds']['min']:.2f}..{m['step_seconds']['max']:.2f})"
            ),
        ),  # fmt: skip
        row("tokens/s", lambda m: f"{m['tokens_per_s']['median']:,.0f}"),
        *(row(name, lambda m, name=name: phase_cell(m, name)) for name in [*ENGINE_PHASES, "rest"]),
        "",
        f"tnf_scale's tokens/s over the stock model's: {ratio['median']:.2f}x (trial by trial "
        + ", ".join(f"{r:.2f}x" for r in ratio["trials"])
        + ").",
    ]
    return "\n".join(lines) + "\n"
