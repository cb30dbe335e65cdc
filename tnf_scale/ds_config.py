"""The DeepSpeed config of a run: the user's JSON file, with "auto" and missing values filled from the flags.

Values the file states explicitly must agree with the flags; a disagreement is one sentence
naming both, never a silent override.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tnf_scale.config import RunConfig, check_deepspeed_config_path
from tnf_scale.distributed import ParallelDims
from tnf_scale.errors import ConfigError
from tnf_scale.precision import Precision, resolve_precision

DEFAULT_DS_CONFIG: dict[str, Any] = {"zero_optimization": {"stage": 1}}


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


def parallel_dims(
    ds: dict[str, Any], cfg: RunConfig, world_size: int, source: str, world_source: str = ""
) -> ParallelDims:
    """Pipeline degree from the config's `pipeline.stages`; refused when it does not fit the model or the world."""
    stages = ds.get("pipeline", {}).get("stages", "auto")
    stages = 1 if stages == "auto" else stages
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(
            f"{source} sets pipeline.stages={stages!r}; use a whole number of stages (1 for no pipeline)."
        )
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
    dims = parallel_dims(ds, cfg, world_size, source, world_source)
    data_parallel_size = dims.data
    per_step = cfg.micro_batch_size * data_parallel_size
    if cfg.global_batch_size % per_step:
        raise ConfigError(
            f"--global_batch_size {cfg.global_batch_size} is not a multiple of --micro_batch_size "
            f"{cfg.micro_batch_size} "
            f"x {data_parallel_size} data-parallel ranks{world_source}; choose sizes where it is."
        )
    _agree(ds, "train_batch_size", cfg.global_batch_size, "--global_batch_size", source)
    _agree(ds, "train_micro_batch_size_per_gpu", cfg.micro_batch_size, "--micro_batch_size", source)
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
    for key, value in (("lr", cfg.lr), ("weight_decay", cfg.weight_decay), ("betas", [0.9, 0.999]), ("eps", 1e-6)):
        _agree(
            params,
            key,
            value,
            f"--{key}" if key in ("lr", "weight_decay") else "the default",
            f"{source} optimizer.params",
        )

    ds.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})
    sched = ds["scheduler"].setdefault("params", {})
    for key, value, flag in (
        ("total_num_steps", cfg.max_steps, "--max_steps"),
        ("warmup_num_steps", cfg.warmup_steps, "--warmup_steps"),
        ("warmup_max_lr", cfg.lr, "--lr"),
        ("warmup_min_lr", 0.0, "the default"),
        ("warmup_type", "linear", "the default"),
    ):
        if ds["scheduler"]["type"] == "WarmupDecayLR" or key in sched:
            _agree(sched, key, value, flag, f"{source} scheduler.params")

    precision = resolve_precision(cfg.precision, ds.get("bf16", {}).get("enabled", "auto"), native_bf16, source)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision.bf16}
    if precision.bf16:
        set_fp32_gradients(ds, dims, source)
    ds.setdefault("steps_per_print", 10**9)  # progress is ours; DeepSpeed's own step log would repeat it
    return ds, dims, precision


def set_fp32_gradients(ds: dict[str, Any], dims: ParallelDims, source: str) -> None:
    """bf16 compute with fp32 gradient accumulation and reduction, as large-scale trainers run it.

    Under ZeRO DeepSpeed accumulates into fp32 when `data_types.grad_accum_dtype` says so (stage 1 then runs its
    BF16_Optimizer, stages 2 and 3 keep fp32 gradient partitions); a pipeline runs the BF16_Optimizer, which
    accumulates into fp32, at any stage. Data parallelism without ZeRO would accumulate in bf16: refused.
    """
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and dims.pipeline == 1:
        raise ConfigError(
            f"bf16 with ZeRO stage 0 ({source}) would accumulate and reduce gradients in bf16; use ZeRO stage 1 or "
            "more (e.g. ds_configs/zero1.json), or --precision fp32."
        )
    if stage >= 1:
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("communication_data_type", "fp32")
