"""What every training entry point does before its model exists: ranks, DeepSpeed config, process group,
run directory, data. Used by train.py and by the Hugging Face Trainer peer (reports/hf_peer.py)."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from deepspeed.accelerator import get_accelerator

from tnf_scale.config import RunConfig, parse_args
from tnf_scale.data.prepared import PreparedData, prepare_data
from tnf_scale.distributed import (
    ParallelDims,
    RankInfo,
    Topology,
    any_rank_on_control,
    check_gloo_address,
    check_master_port,
    check_this_node,
    device_name,
    discover,
    end_process_groups,
    init_distributed,
)
from tnf_scale.ds_config import build_ds_config, micro_batch_note
from tnf_scale.errors import ConfigError, PeerStopped, Refusal, exit_code, rank_line
from tnf_scale.init_from import InitSource, check_same_words, read_init_source
from tnf_scale.model_flops import compute_math
from tnf_scale.ops import ask_for_the_cpu_once, this_nodes_fused_adam
from tnf_scale.precision import Precision, device_native_bf16
from tnf_scale.preflight import check_runner_hostfile
from tnf_scale.progress_log import on_terminal
from tnf_scale.run_dir import RunDir
from tnf_scale.run_lock import RunLock
from tnf_scale.settings import by_section
from tnf_scale.threads import set_intra_op_threads

WORLD_SOURCES = {"slurm": " in the SLURM allocation (SLURM_NTASKS)", "mpi": " started by MPI"}


@dataclass
class Started:
    topo: Topology
    ds_config: dict[str, Any]
    precision: Precision
    optimizer_note: str  # why the optimizer is not DeepSpeed's fused Adam, if it is not
    micro_batch_note: str  # why the micro-batch is not --max_micro_batch_size, if it is not
    run: RunDir
    lock: RunLock  # held by global rank 0
    data: PreparedData
    log: Callable[..., None]  # prints on global rank 0 only
    init: InitSource | None = None  # what --init_from starts the run from

    def run_details(self) -> dict[str, str]:
        """What provenance.json records of how the run computes: its precision, the math its matmuls compute in (its
        MFU's peak) and its device (a GPU's exact name)."""
        return {
            "precision": self.precision.name,
            "math": compute_math(self.precision.name, self.topo.device.type),
            "device": device_name(self.topo.device),
        }


def command(run: Callable[[RunConfig], int], argv: list[str] | None) -> int:
    """A training command's main: flags parsed into a RunConfig, DeepSpeed's own log held to warnings, and a bad
    input ended in one line on stderr with exit code 2."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # a batch job's stdout is a pipe or a file, block-buffered: each progress line must reach the job's log when said
    if hasattr(sys.stdout, "reconfigure"):  # not when a caller swapped in another stream
        sys.stdout.reconfigure(line_buffering=True)
    ask_for_the_cpu_once()
    # The libraries' million objects live as long as the process: out of the collector's sight, a full collection
    # (DeepSpeed's BF16_Optimizer forces four at start-up) takes milliseconds instead of a second.
    gc.freeze()
    try:
        return exit_code(lambda: run_or_print(run, parse_args(argv)))
    finally:
        end_process_groups()
        gc.freeze()  # every file is written and closed: the interpreter's exit skips a full collection (about 2 s)


def run_or_print(run: Callable[[RunConfig], int], cfg: RunConfig) -> int:
    """The run, or with --print_config what it would be."""
    return print_config(cfg) if cfg.print_config else run(cfg)


def launch_plan(cfg: RunConfig) -> tuple[RankInfo, dict[str, Any], ParallelDims, Precision, tuple[bool, str], str]:
    """What this launch would run with, checked before anything starts: this rank, the DeepSpeed config built for
    its world size, the parallel degrees, the precision, whether DeepSpeed's fused Adam runs here, and why the
    micro-batch is not --max_micro_batch_size when it is not. `cfg.micro_batch_size` becomes the one the run uses."""
    check_this_node()
    check_runner_hostfile()
    info = discover()
    check_gloo_address(info)
    fused_adam = this_nodes_fused_adam()
    world_source = WORLD_SOURCES.get(info.source, "")
    ds_config, dims, precision = build_ds_config(
        cfg, info.world_size, device_native_bf16(get_accelerator()), world_source, fused_adam
    )
    micro_note = micro_batch_note(cfg, dims.data, world_source)
    cfg.micro_batch_size = ds_config["train_micro_batch_size_per_gpu"]
    return info, ds_config, dims, precision, fused_adam, micro_note


def print_config(cfg: RunConfig) -> int:
    """--print_config: global rank 0 prints the resolved settings by section and the DeepSpeed config this launch
    would run with, as YAML (the settings part is a --config file); nothing is started, claimed or written."""
    info, ds_config, dims, precision, fused_adam, micro_note = launch_plan(cfg)
    if info.rank == 0:
        accumulation = ds_config["gradient_accumulation_steps"]
        launch = {
            "world": f"{info.world_size} ranks (from {info.source}): {dims.pipeline} pipeline stages x {dims.data} "
            f"data-parallel",
            "batch": f"{cfg.global_batch_size} sequences per step = micro-batch {cfg.micro_batch_size} x {dims.data} "
            f"replicas x {accumulation} accumulation steps" + (f" ({micro_note})" if micro_note else ""),
            "precision": precision.describe(),
            "optimizer": fused_adam[1] if fused_adam[0] else f"torch's fused AdamW: {fused_adam[1]}",
        }
        plan = {"launch": launch, "settings": by_section(cfg), "deepspeed_config": ds_config}
        print(yaml.safe_dump(plan, sort_keys=False, width=120), end="")
    return 0


def prepare_on_local_rank0(cfg: RunConfig, topo: Topology, log, own_tokenizer: Path | None) -> PreparedData:
    """Local rank 0 of each node prepares (or finds) the data, encoded with `own_tokenizer` when it is given; the other
    ranks then load it. Bad data input stops every rank: the preparer says why in one sentence, the others exit with
    it silently."""
    refusal = None
    if topo.local_rank == 0:
        try:
            data = prepare_data(cfg, log, topo.is_main and on_terminal(), own_tokenizer)
        except Refusal as err:
            refusal = err
    if any_rank_on_control(refusal is not None, topo):  # also where the other ranks wait, as long as it takes
        raise refusal or PeerStopped()
    if topo.local_rank != 0:
        data = prepare_data(cfg, lambda *_: None, False, own_tokenizer)
    return data


def start(cfg: RunConfig, pipeline_refusal: str | None = None) -> Started:
    """Everything up to the model: the DeepSpeed config and the parallel degrees are checked (and, with
    `pipeline_refusal`, a pipeline refused) before any process group starts; the data is prepared before
    `--overwrite` deletes an old run."""
    info, ds_config, dims, precision, fused_adam, micro_note = launch_plan(cfg)
    if pipeline_refusal and dims.pipeline > 1:
        raise ConfigError(pipeline_refusal)
    threads = set_intra_op_threads(cfg.intra_op_threads, info.local_size)  # before anything computes
    check_master_port(info)
    topo = init_distributed(info, dims)
    rank_line(f"{info.describe()}; {threads}")  # one line per rank
    log = print if topo.is_main else (lambda *_: None)
    run = RunDir(cfg.output_dir)
    run.check(cfg)
    lock = lock_run_dir(run, topo, log)
    own_tokenizer = run.own_tokenizer(cfg)
    data = prepare_on_local_rank0(cfg, topo, log, own_tokenizer)  # a bad corpus stops here, before anything is deleted
    check_eval_split(len(data.eval), cfg.eval_sequences, dims.data)  # every rank alike, before anything is deleted
    check_train_split(len(data.train), cfg.global_batch_size)
    init = read_init_source(cfg.init_from) if cfg.init_from else None
    if init:
        check_same_words(init, data.tokenizer_dir, data.rare_vocab_path)
    run.claim(cfg, topo)
    optimizer_note = "" if fused_adam[0] else f"torch's fused AdamW: {fused_adam[1]}"
    return Started(topo, ds_config, precision, optimizer_note, micro_note, run, lock, data, log, init)


def check_eval_split(held_out: int, eval_sequences: int, replicas: int) -> None:
    """Each data-parallel replica scores at least one held-out sequence."""
    size = min(held_out, eval_sequences)
    if size < replicas:
        raise ConfigError(
            f"--eval_sequences {size} (the held-out set's size, if smaller) is fewer than the {replicas} "
            "data-parallel replicas; pass at least one sequence per replica."
        )


def check_train_split(train: int, global_batch_size: int) -> None:
    """A step's global batch fits in the training set."""
    if global_batch_size > train:
        raise ConfigError(
            f"--global_batch_size {global_batch_size} exceeds the {train} training sequences; use a smaller batch or "
            "a larger corpus."
        )


def lock_run_dir(run: RunDir, topo: Topology, log) -> RunLock:
    """Global rank 0 locks the run directory (saying so when it takes over a stale lock); every rank stops (rank 0
    saying why) when it cannot."""
    lock = RunLock(run.lock_file)
    refusal = None
    if topo.is_main:
        try:
            lock.acquire(log)
        except Refusal as err:
            refusal = err
    if any_rank_on_control(refusal is not None, topo):
        raise refusal or PeerStopped()
    return lock
