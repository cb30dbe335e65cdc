"""The DeepSpeed config of a run: the user's JSON file, with "auto" and missing values filled from the flags.

Values the file states explicitly must agree with the flags; a disagreement is one sentence
naming both, never a silent override. The names in the file (sections, optimizer, scheduler) are checked against
what DeepSpeed reads first, and the config built is then read by DeepSpeed's own config model, before any process
group starts, so that what DeepSpeed would reject is refused in one sentence while nothing has been touched.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
from pathlib import Path
from typing import Any

import pydantic
import torch
from deepspeed.runtime import lr_schedules
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig

from tnf_scale.config import RunConfig, check_deepspeed_config_path
from tnf_scale.distributed import ParallelDims
from tnf_scale.errors import ConfigError
from tnf_scale.precision import Precision, resolve_precision

DEFAULT_DS_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 1}}
ADAM_FAMILY = ("adam", "adamw", "lamb")


def load_ds_file(path: str | None) -> dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    check_deepspeed_config_path(path)
    try:
        loaded = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"--deepspeed_config {path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file."
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object.")
    for key in ("zero_optimization", "pipeline", "bf16", "fp16", "optimizer", "scheduler", "data_types"):
        if key in loaded and not isinstance(loaded[key], dict):
            raise ConfigError(f'--deepspeed_config {path} sets "{key}" to {loaded[key]!r}; it must be a JSON object.')
    fp16 = loaded.get("fp16", {}).get("enabled", False)  # DeepSpeed's default: a section without it is off
    if fp16 is not False:
        raise ConfigError(
            f"--deepspeed_config {path} sets fp16.enabled={json.dumps(fp16)}; tnf_scale trains in bf16 or fp32 "
            '(--precision), without fp16\'s loss scaling: remove the "fp16" section and choose with --precision.'
        )
    return loaded


def _agree(ds: dict, key: str, value: Any, flag: str, source: str) -> None:
    """Fill ds[key] with value when it is missing or "auto"; refuse a different explicit value."""
    current = ds.get(key, "auto")
    if current == "auto":
        ds[key] = value
    elif current != value:
        raise ConfigError(
            f'{source} sets {key}={current} but {flag} gives {value}; make them agree or set {key} to "auto".'
        )


def pipeline_stages(ds: dict[str, Any], source: str) -> int:
    """The config's `pipeline.stages` ("auto" or absent: 1), refused in one sentence unless a whole number from 1."""
    stages = ds.get("pipeline", {}).get("stages", "auto")
    stages = 1 if stages == "auto" else stages
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
        raise ConfigError(
            f"{source} sets pipeline.stages={stages!r}; use a whole number of stages (1 for no pipeline)."
        )
    return stages


def parallel_dims(
    ds: dict[str, Any], cfg: RunConfig, world_size: int, source: str, world_source: str = ""
) -> ParallelDims:
    """Pipeline degree from the config's `pipeline.stages`; refused when it does not fit the model or the world."""
    stages = pipeline_stages(ds, source)
    if stages > cfg.num_layers:
        raise ConfigError(
            f"{source} asks for {stages} pipeline stages but the model has only {cfg.num_layers} encoder "
            f"layers; use at most {cfg.num_layers} stages."
        )
    if world_size % stages:
        raise ConfigError(
            f"{world_size} ranks{world_source} cannot be split into {stages} pipeline stages ({source}); "
            f"launch a multiple of {stages} ranks."
        )
    return ParallelDims(stages, world_size // stages)


def asked_micro_batch(cfg: RunConfig, ds: dict[str, Any]) -> int | None:
    """The micro-batch the user asked for: --micro_batch_size, else the DeepSpeed file's own value, else None."""
    in_file = ds.get("train_micro_batch_size_per_gpu")
    if cfg.micro_batch_size is not None or not isinstance(in_file, int) or isinstance(in_file, bool):
        return cfg.micro_batch_size
    return in_file


def fit_micro_batch(cfg: RunConfig, replicas: int, world_source: str = "", asked: int | None = None) -> tuple[int, str]:
    """The micro-batch for `replicas` data-parallel ranks, and why it is not the bound when it is not: the one
    `asked` for exactly (default --micro_batch_size), or the largest up to --max_micro_batch_size that divides the
    global batch over the replicas. A micro-batch that does not fit, or a global batch the replicas cannot share, is
    refused with the sizes that work."""
    asked = cfg.micro_batch_size if asked is None else asked
    batch = cfg.global_batch_size
    fits = [m for m in range(1, batch // replicas + 1) if batch % (m * replicas) == 0] if batch % replicas == 0 else []
    if asked is not None:
        if asked in fits:
            return asked, ""
        if not fits:
            raise ConfigError(no_micro_batch_fits(batch, replicas, world_source))
        raise ConfigError(
            f"--global_batch_size {batch} is not a multiple of --micro_batch_size {asked} x {replicas} "
            f"data-parallel ranks{world_source}; micro-batches that fit: {', '.join(map(str, fits[::-1][:6]))} (or "
            "leave --micro_batch_size unset to take the largest up to --max_micro_batch_size)."
        )
    allowed = [m for m in fits if m <= cfg.max_micro_batch_size]
    if not allowed:
        raise ConfigError(no_micro_batch_fits(batch, replicas, world_source))
    chosen = allowed[-1]
    if chosen == cfg.max_micro_batch_size:
        return chosen, ""
    return chosen, (
        f"micro-batch {chosen}: {cfg.max_micro_batch_size} x {replicas} replicas does not divide the global batch "
        f"{batch}"
    )


def micro_batch_note(cfg: RunConfig, replicas: int, world_source: str = "") -> str:
    """Why the micro-batch build_ds_config takes is below --max_micro_batch_size, or "" (it is not, or it was asked
    for)."""
    return fit_micro_batch(cfg, replicas, world_source, asked_micro_batch(cfg, load_ds_file(cfg.deepspeed_config)))[1]


def no_micro_batch_fits(batch: int, replicas: int, world_source: str) -> str:
    """The refusal of a global batch that `replicas` data-parallel ranks cannot share, with world sizes that can."""
    shares = [r for r in range(1, batch + 1) if batch % r == 0 and r != replicas]
    nearest = sorted(shares, key=lambda r: abs(r - replicas))[:2]
    return (
        f"--global_batch_size {batch} cannot be shared by {replicas} data-parallel ranks{world_source}: it is not a "
        f"multiple of {replicas}; use a global batch that is (e.g. {replicas * max(1, round(batch / replicas))}) or "
        f"{' or '.join(map(str, sorted(nearest)))} data-parallel ranks."
    )


# --lr_schedule -> DeepSpeed's scheduler: both warm up linearly from --min_lr to --lr, then fall to --min_lr.
SCHEDULES = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


def scheduler_params(cfg: RunConfig) -> list[tuple[str, Any, str]]:
    """(key, value, the flag it comes from) of the DeepSpeed scheduler --lr_schedule names."""
    common = [
        ("total_num_steps", cfg.max_steps, "--max_steps"),
        ("warmup_num_steps", cfg.warmup_steps, "--warmup_steps"),
        ("warmup_type", "linear", "the default"),
    ]
    if cfg.lr_schedule == "cosine":  # WarmupCosineLR scales the optimizer's --lr by ratios
        ratio = cfg.min_lr / cfg.lr
        return [*common, ("warmup_min_ratio", ratio, "--min_lr / --lr"), ("cos_min_ratio", ratio, "--min_lr / --lr")]
    return [*common, ("warmup_max_lr", cfg.lr, "--lr"), ("warmup_min_lr", cfg.min_lr, "--min_lr")]


def build_ds_config(
    cfg: RunConfig,
    world_size: int,
    native_bf16: tuple[bool, str],
    world_source: str = "",
    fused_adam: tuple[bool, str] = (True, "DeepSpeed's fused Adam"),
) -> tuple[dict[str, Any], ParallelDims, Precision]:
    """A complete DeepSpeed config for this run and world size, the parallel degrees and the precision it implies.

    `native_bf16` says whether the device computes bf16 natively, and why (precision.device_native_bf16);
    `fused_adam` whether DeepSpeed's fused Adam runs here (ops.this_nodes_fused_adam): if not, the default optimizer
    is torch's fused AdamW;
    `world_source` says where the world size came from, for the messages (e.g. " in the SLURM allocation").
    """
    source = f"--deepspeed_config {cfg.deepspeed_config}" if cfg.deepspeed_config else "the default DeepSpeed config"
    ds = load_ds_file(cfg.deepspeed_config)
    check_names(ds, source)
    dims = parallel_dims(ds, cfg, world_size, source, world_source)
    micro, _ = fit_micro_batch(cfg, dims.data, world_source, asked_micro_batch(cfg, ds))
    per_step = micro * dims.data
    _agree(ds, "train_batch_size", cfg.global_batch_size, "--global_batch_size", source)
    _agree(ds, "train_micro_batch_size_per_gpu", micro, "--micro_batch_size", source)
    _agree(
        ds,
        "gradient_accumulation_steps",
        cfg.global_batch_size // per_step,
        "--global_batch_size / (--micro_batch_size x ranks)",
        source,
    )
    _agree(ds, "gradient_clipping", cfg.grad_clip, "--grad_clip", source)

    ds.setdefault(
        "optimizer", {"type": "AdamW", "params": {} if fused_adam[0] else {"torch_adam": True, "fused": True}}
    )
    params = ds["optimizer"].setdefault("params", {})
    defaults = [("lr", cfg.lr), ("weight_decay", cfg.weight_decay)]
    if str(ds["optimizer"].get("type", "")).lower() in ADAM_FAMILY:  # other optimizers take no betas or eps
        defaults += [("betas", [0.9, 0.999]), ("eps", 1e-6)]
    for key, value in defaults:
        _agree(
            params,
            key,
            value,
            f"--{key}" if key in ("lr", "weight_decay") else "the default",
            f"{source} optimizer.params",
        )

    schedule = SCHEDULES[cfg.lr_schedule]
    ds.setdefault("scheduler", {"type": schedule, "params": {}})
    sched = ds["scheduler"].setdefault("params", {})
    for key, value, flag in scheduler_params(cfg):
        if ds["scheduler"]["type"] == schedule or key in sched:
            _agree(sched, key, value, flag, f"{source} scheduler.params")

    if cfg.compile and ds.get("zero_optimization", {}).get("stage") == 3:
        raise ConfigError(
            f"--compile with ZeRO stage 3 ({source}): stage 3 gathers each layer's parameters in module hooks, which "
            "a compiled layer would trace; use ZeRO stage 1 or 2, or drop --compile."
        )
    precision = resolve_precision(cfg.precision, ds.get("bf16", {}).get("enabled", "auto"), native_bf16, source)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision.bf16}
    if precision.bf16:
        set_fp32_gradients(ds, dims, source)
    ds.setdefault("steps_per_print", 10**9)  # progress is ours; DeepSpeed's own step log would repeat it
    check_with_deepspeed(ds, dims, source)
    return ds, dims, precision


def set_fp32_gradients(ds: dict[str, Any], dims: ParallelDims, source: str) -> None:
    """bf16 compute with fp32 gradient accumulation and reduction, as large-scale trainers run it.

    Under ZeRO DeepSpeed accumulates into fp32 when `data_types.grad_accum_dtype` says so (stage 1 then runs its
    BF16_Optimizer, stages 2 and 3 keep fp32 gradient partitions); a pipeline runs the BF16_Optimizer, which
    accumulates into fp32, at any stage. Data parallelism without ZeRO would accumulate in bf16: refused.
    """
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"{source} sets zero_optimization.stage to {stage!r}; use a whole number from 0 to 3.")
    if stage == 0 and dims.pipeline == 1:
        raise ConfigError(
            f"bf16 with ZeRO stage 0 ({source}) would accumulate and reduce gradients in bf16; use ZeRO stage 1 or "
            "more (e.g. ds_configs/zero1.json), or --precision fp32."
        )
    if stage >= 1:
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("communication_data_type", "fp32")


class _ReadKeys(dict):
    """A dict that remembers which keys were looked up (present or not), through every shallow copy of it."""

    def __init__(self, *args, read: set[str]):
        super().__init__(*args)
        self.read = read

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


@functools.cache
def deepspeed_sections() -> frozenset[str]:
    """The top-level keys DeepSpeed's config reader looks up (present or not), found by letting it read a minimal
    config through a dict that remembers every lookup."""
    read: set[str] = set()
    minimal = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    DeepSpeedConfig(_ReadKeys(minimal, read=read))
    return frozenset(read)


def check_names(ds: dict[str, Any], source: str) -> None:
    """Refuse what the user's config names that DeepSpeed would not recognise: a top-level section it does not read
    whose name is close to one it does (a misspelling it would silently ignore), or an optimizer or scheduler type
    that is neither DeepSpeed's nor torch's (the engine's own rule, applied once the ranks are up)."""
    sections = deepspeed_sections()
    for key in ds:
        close = difflib.get_close_matches(key, sections, n=1, cutoff=0.8) if key not in sections else []
        if close:
            raise ConfigError(
                f'{source} has a section "{key}" that DeepSpeed does not read; did you mean "{close[0]}"?'
            )
    optimizer = str(ds.get("optimizer", {}).get("type", "AdamW"))
    if optimizer.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, optimizer):
        raise ConfigError(
            f'{source} names optimizer "{optimizer}", which is neither one of DeepSpeed\'s '
            f"({', '.join(DEEPSPEED_OPTIMIZERS)}) nor in torch.optim; fix optimizer.type."
        )
    scheduler = str(ds.get("scheduler", {}).get("type", "WarmupDecayLR"))
    if not hasattr(lr_schedules, scheduler) and not hasattr(torch.optim.lr_scheduler, scheduler):
        raise ConfigError(
            f'{source} names scheduler "{scheduler}", which is neither one of DeepSpeed\'s '
            f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) nor in torch.optim.lr_scheduler; fix scheduler.type."
        )


def check_with_deepspeed(ds: dict[str, Any], dims: ParallelDims, source: str) -> None:
    """Refuse, in one sentence, what DeepSpeed would reject once the ranks are up: its config model and sanity
    checks on the config built (read here for one rank, so the batch size is the per-replica one), and the pipeline
    engine's rule on ZeRO."""
    one_replica = {**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]}
    try:
        parsed = DeepSpeedConfig(one_replica)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        # DeepSpeed validates each section with its own model, so the location starts inside the section
        section = [key for key, value in ds.items() if isinstance(value, dict) and loc and loc[0] in value][:1]
        where = ".".join(section + loc)
        raise ConfigError(
            f"DeepSpeed rejects {source}: {where} = {first['input']!r}: {first['msg']}; fix the file."
        ) from None
    except (AssertionError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"DeepSpeed rejects {source}: {str(err) or type(err).__name__}; fix the file.") from None
    if dims.pipeline > 1 and parsed.zero_optimization_stage >= 2:
        raise ConfigError(
            f"{source} runs ZeRO stage {parsed.zero_optimization_stage} under a pipeline, which DeepSpeed does not "
            "support (its gradients are partitioned); use ZeRO stage 0 or 1 with pipeline stages."
        )
