"""Checkpoints: the DeepSpeed engine, every rank's note rows with their ids, the data position and RNG.

Layout: `<output_dir>/checkpoints/step00000300/` holds DeepSpeed's files, one
`notes_rank00000.safetensors` per rank, `MANIFEST.json` (the sha256 and size of every other file, read
back from disk once every rank has finished) and, written last by rank 0, `COMPLETE` (JSON). A
checkpoint without `COMPLETE` is never resumed from, and one whose files differ from its manifest is
refused by name before anything is loaded.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tnf_scale.config import ConfigError, RunConfig
from tnf_scale.distributed import Topology
from tnf_scale.run_dir import RunDir

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
LOW_SPACE_BYTES = 64 << 20  # below this, a failed write is taken for a full disk
# What a checkpoint's tensors and data order depend on: a resume must keep them (the rest, e.g. --max_steps, may change).
RESUME_MUST_MATCH = ("objective", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "generator_fraction",
                     "max_seq_len", "tnf", "global_batch_size", "seed")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from, named with the file at fault and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return RunDir(output_dir).checkpoints


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def notes_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"notes_rank{rank:05d}.safetensors"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint directories that hold a COMPLETE marker, oldest first."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("step*") if p.is_dir() and (p / COMPLETE).is_file()) if root.is_dir() else []


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint directory that holds a COMPLETE marker, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(ckpt: Path) -> list[Path]:
    """The files a manifest covers: everything in the checkpoint but the manifest and the COMPLETE marker."""
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE, f"{COMPLETE}.tmp", f"{MANIFEST}.tmp"))


def gather_from_ranks(mine: object) -> list:
    """Every rank's `mine`, on every rank (one collective on the world)."""
    if not torch.distributed.is_initialized():
        return [mine]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def write_manifest(ckpt: Path, rank: int, world_size: int) -> None:
    """sha256 and size of every checkpoint file, hashed in parallel (file i by rank i mod world) from what is on disk;
    rank 0 writes the manifest. Collective."""
    files = checkpoint_files(ckpt)
    mine = {str(p.relative_to(ckpt)): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
            for i, p in enumerate(files) if i % world_size == rank}
    entries = {name: entry for part in gather_from_ranks(mine) for name, entry in part.items()}
    if rank == 0:
        (ckpt / f"{MANIFEST}.tmp").write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
        (ckpt / f"{MANIFEST}.tmp").rename(ckpt / MANIFEST)


def manifest_problems(ckpt: Path, rank: int, world_size: int) -> list[str]:
    """What differs between a checkpoint's files and its manifest (checked in parallel: entry i by rank i mod world),
    on every rank; empty for a checkpoint written before manifests existed. Collective."""
    path = ckpt / MANIFEST
    entries = sorted(json.loads(path.read_text()).items()) if path.is_file() else []
    mine = []
    for i, (name, entry) in enumerate(entries):
        if i % world_size != rank:
            continue
        file = ckpt / name
        if not file.is_file():
            mine.append(f"{name} is missing")
        elif file.stat().st_size != entry["bytes"]:
            mine.append(f"{name} has {file.stat().st_size} bytes, not {entry['bytes']} (truncated or overwritten)")
        elif sha256_of(file) != entry["sha256"]:
            mine.append(f"{name} differs from its checksum (changed or corrupt)")
    return sorted(problem for part in gather_from_ranks(mine) for problem in part)


def write_failure(err: Exception, ckpt: Path, last_complete: Path | None) -> CheckpointError:
    """One sentence for a checkpoint that could not be written, a full disk named as such."""
    free = shutil.disk_usage(ckpt.parent).free if ckpt.parent.exists() else 0
    full = getattr(err, "errno", None) == errno.ENOSPC or free < LOW_SPACE_BYTES
    cause = f"no space left on device ({free >> 20} MB free)" if full else f"{type(err).__name__}: {err}"
    kept = f"the last complete checkpoint, {last_complete.name}, is intact" if last_complete else "no complete checkpoint exists yet"
    fix = "free space or move --output_dir to a larger file system" if full else "fix the cause"
    return CheckpointError(f"writing checkpoint {ckpt} failed: {cause}; {kept} — {fix}, then rerun with --resume true.")


def save_checkpoint(engine, output_dir: str | Path, step: int, rank: int, world_size: int,
                    note_state: dict[str, torch.Tensor] | None, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint of this step on every rank; the manifest, then COMPLETE, appear only after all files are written.
    A rank that cannot write raises CheckpointError (the others then fail in the next collective)."""
    root = checkpoint_root(output_dir)
    tag = tag_for(step)
    ckpt = root / tag
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"trainer": trainer_state})
        tensors = {"torch_rng_state": torch.get_rng_state()}
        if note_state is not None:
            tensors.update(note_state)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(notes_file(ckpt, rank)))
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as "unexpected pos ..."
        raise write_failure(err, ckpt, latest_complete(output_dir)) from None
    deepspeed.comm.barrier()
    write_manifest(ckpt, rank, world_size)
    if rank == 0:
        marker = {"step": step, "world_size": world_size, "notes": note_state is not None, **trainer_state}
        (ckpt / f"{COMPLETE}.tmp").write_text(json.dumps(marker, indent=2) + "\n")
        (ckpt / f"{COMPLETE}.tmp").rename(ckpt / COMPLETE)
    deepspeed.comm.barrier()
    return ckpt


def read_rank_files(ckpt: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's file of a checkpoint; a missing or unreadable one is refused by name."""
    states = []
    for rank in range(world_size):
        path = notes_file(ckpt, rank)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {path.name}; resume from an earlier complete checkpoint or start fresh.")
        try:
            states.append(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({err}); resume from an earlier checkpoint or start fresh.") from None
    return states


def check_note_rows(states: list[dict[str, torch.Tensor]], num_rare: int, ckpt: Path) -> None:
    """Every rare id 0..num_rare-1 must appear exactly once across the ranks' files."""
    ids = torch.cat([s["ids"] for s in states])
    in_range = len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < num_rare)
    if len(ids) != num_rare or not in_range or not bool((torch.bincount(ids, minlength=num_rare) == 1).all()):
        raise CheckpointError(
            f"checkpoint {ckpt} holds {len(ids)} note rows but the rare vocabulary has {num_rare} words, each needed exactly once; "
            "it belongs to other data or is damaged — resume with the data it was trained on, or from another checkpoint."
        )


@dataclass
class ResumePoint:
    """A complete checkpoint chosen for resuming, checked before any engine exists."""

    ckpt: Path
    marker: dict[str, Any]
    rank_files: list[dict[str, torch.Tensor]]

    @property
    def step(self) -> int:
        return self.marker["step"]

    @property
    def world_size(self) -> int:
        return self.marker["world_size"]


def check_manifest(ckpt: Path, rank: int, world_size: int) -> None:
    """Refuse, naming the files at fault and offering the previous complete checkpoint, a checkpoint whose files differ
    from its manifest. Collective."""
    problems = manifest_problems(ckpt, rank, world_size)
    if not problems:
        return
    earlier = [p for p in complete_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    offer = (f"the previous complete checkpoint is {earlier[-1].name}: move the damaged one aside (mv {ckpt} {ckpt}.damaged) and "
             "rerun with --resume true to continue from it" if earlier else "no earlier complete checkpoint exists: start again with --overwrite true")
    raise CheckpointError(f"checkpoint {ckpt} does not match its manifest ({'; '.join(problems[:3])}); {offer}.")


def plan_resume(output_dir: str | Path, rare_vocab_digest: str, num_rare: int | None, rank: int = 0, world_size: int = 1) -> ResumePoint:
    """The newest complete checkpoint, its files checked against the manifest, then its note files read and validated
    (num_rare None: a baseline run). Collective when a process group exists."""
    ckpt = latest_complete(output_dir)
    if ckpt is None:
        raise CheckpointError(f"--resume found no complete checkpoint under {checkpoint_root(output_dir)}; drop --resume to start a fresh run there.")
    check_manifest(ckpt, rank, world_size)
    marker = json.loads((ckpt / COMPLETE).read_text())
    if marker.get("rare_vocab_digest") != rare_vocab_digest:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with a different rare vocabulary than the data prepared now; "
            "resume with the same corpus, tokenizer and rare band."
        )
    rank_files = read_rank_files(ckpt, marker["world_size"])
    if num_rare is not None:
        if not marker["notes"]:
            raise CheckpointError(f"checkpoint {ckpt} comes from a --tnf off run and holds no notes; resume it with --tnf off.")
        check_note_rows(rank_files, num_rare, ckpt)
    return ResumePoint(ckpt, marker, rank_files)


def universal_checkpoint(point: ResumePoint, rank: int) -> Path:
    """DeepSpeed's universal form of the checkpoint, which loads on any number of ranks (converted once, by rank 0)."""
    target = point.ckpt.parent / "universal" / point.ckpt.name
    if rank == 0 and not (target / COMPLETE).is_file():
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(point.ckpt),
                        "--output_folder", str(target)], check=True, capture_output=True)
        (target.parent / "latest").write_text(point.ckpt.name)
        (target / COMPLETE).write_text(json.dumps(point.marker))
    deepspeed.comm.barrier()
    return target


def load_engine(engine, point: ResumePoint, source: Path, rank: int) -> None:
    """Load model and optimizer state from `source` (the checkpoint or its universal form) and this rank's RNG."""
    if rank < point.world_size:
        torch.set_rng_state(point.rank_files[rank]["torch_rng_state"])
    load_path, _ = engine.load_checkpoint(str(source.parent), tag=source.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {source}; its model or optimizer files are missing.")


class Checkpointer:
    """A run's checkpoints from start to end, used once at start, once per save, and at the end.

    plan (with --resume: the newest complete checkpoint, checked before the model exists), adapt (the DeepSpeed
    config that loads it: DeepSpeed's universal form when the ZeRO state was saved on another number of ranks),
    load (model, optimizer, RNG, and this rank's note rows, re-partitioned), save, final, note_rows (for export).
    """

    def __init__(self, run: RunDir, topo: Topology, rare_vocab: Path, num_rare: int | None):
        """`rare_vocab` is the data's rare vocabulary file (checkpoints must match it); `num_rare` is None without notes."""
        self.run, self.topo, self.num_rare = run, topo, num_rare
        self.rare_vocab_digest = hashlib.sha256(rare_vocab.read_bytes()).hexdigest()[:16]
        self.point: ResumePoint | None = None
        self.source: Path | None = None  # what DeepSpeed loads: the checkpoint, or its universal form
        self.last_saved: int | None = None

    def plan(self, cfg: RunConfig) -> None:
        """With --resume, choose and validate the newest complete checkpoint against `cfg`; nothing is loaded and no run
        file is rewritten yet."""
        self.point = plan_resume(self.run.path, self.rare_vocab_digest, self.num_rare, self.topo.rank, self.topo.size) if cfg.resume else None
        self.source = self.point.ckpt if self.point else None
        if self.point is None:
            return
        if cfg.max_steps < self.point.step:
            raise CheckpointError(f"checkpoint {self.point.ckpt} is at step {self.point.step}, beyond --max_steps {cfg.max_steps}; "
                                  f"pass --max_steps {self.point.step} or more to continue it.")
        saved = self.run.read_run_config() if self.run.run_config.is_file() else {}
        for name in RESUME_MUST_MATCH:
            if name in saved and saved[name] != getattr(cfg, name):
                raise CheckpointError(f"the run in {self.run.path} was trained with --{name} {saved[name]}, not {getattr(cfg, name)}; "
                                      f"resume it with --{name} {saved[name]}, or start a new run elsewhere.")

    @property
    def last_complete_step(self) -> int | None:
        """The step of the newest complete checkpoint on disk: where a resume continues (None: there is none)."""
        latest = latest_complete(self.run.path)
        return int(json.loads((latest / COMPLETE).read_text())["step"]) if latest else None

    def adapt(self, ds_config: dict[str, Any]) -> None:
        """Make `ds_config` able to load the planned checkpoint when it was saved on another topology."""
        point = self.point
        saved_stage, stage = point.marker.get("zero_stage") if point else None, ds_config["zero_optimization"].get("stage", 0)
        if saved_stage is not None and saved_stage != stage and 3 in (saved_stage, stage):
            raise CheckpointError(f"checkpoint {point.ckpt} was saved with ZeRO stage {saved_stage} and this run uses stage {stage}; "
                                  f"DeepSpeed loads ZeRO-3 state only into ZeRO-3: resume with a stage {saved_stage} config "
                                  f"(e.g. ds_configs/zero{saved_stage}.json).")
        saved = (point.marker.get("pipeline_stages", 1), point.world_size) if point else None
        if point is None or saved == (self.topo.dims.pipeline, self.topo.size):
            return
        if self.topo.dims.pipeline > 1 or saved[0] > 1:
            raise ConfigError(f"checkpoint {point.ckpt} was saved with {saved[0]} pipeline stages on {saved[1]} ranks; "
                              "resume a pipeline run with the same stages and ranks.")
        if ds_config["zero_optimization"].get("stage", 0) > 0:
            self.source = universal_checkpoint(point, self.topo.rank)
            ds_config["checkpoint"] = {"load_universal": True}

    def load(self, engine, store, state: dict[str, Any]) -> dict[str, Any]:
        """Load the planned checkpoint into `engine` and `store` (None: no notes); returns `state` advanced to it."""
        if self.point is None:
            return state
        load_engine(engine, self.point, self.source, self.topo.rank)
        if store is not None:
            store.load_rows(self.point.rank_files)
        self.last_saved = self.point.step
        return {**state, **{key: self.point.marker[key] for key in ("step", "tokens", "wall_time")}}

    def save(self, engine, store, state: dict[str, Any]) -> Path:
        """A complete checkpoint of step `state["step"]` on every rank. Collective."""
        ckpt = save_checkpoint(engine, self.run.path, state["step"], self.topo.rank, self.topo.size,
                               store.state() if store is not None else None, state)
        self.last_saved = state["step"]
        return ckpt

    def final(self, engine, store, state: dict[str, Any]) -> Path:
        """The checkpoint of the run's last step: saved now unless it already is. Collective."""
        latest = latest_complete(self.run.path)
        if self.last_saved != state["step"] or latest is None:
            return self.save(engine, store, state)
        return latest

    def note_rows(self, ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, vectors) of the whole note dictionary in `ckpt`, gathered from every rank's file."""
        rows = read_rank_files(ckpt, self.topo.size)
        return torch.cat([r["ids"] for r in rows]), torch.cat([r["vectors"] for r in rows])
