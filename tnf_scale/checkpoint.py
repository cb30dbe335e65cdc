"""Checkpoints: the DeepSpeed engine, every rank's note rows with their ids, the data position and RNG.

Layout: `<output_dir>/checkpoints/step00000300/` holds DeepSpeed's files, one
`notes_rank00000.safetensors` per rank, `MANIFEST.json` (the sha256 and size of every other file, read
back from disk once every rank has finished) and, written last by rank 0, `COMPLETE` (JSON). A
checkpoint without `COMPLETE` is never resumed from, and one whose files differ from its manifest is
refused by name before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tnf_scale.config import RESUME_MUST_MATCH, RunConfig, resume_conflict
from tnf_scale.cpu_adam import replay_cpu_adam_steps
from tnf_scale.distributed import Topology, wait_for_all
from tnf_scale.errors import ConfigError, Refusal
from tnf_scale.notes.note_math import owner_of
from tnf_scale.run_dir import RunDir
from tnf_scale.run_state import Stateful

COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
LOW_SPACE_BYTES = 64 << 20  # below this, a failed write is taken for a full disk


class CheckpointError(Refusal):
    """A checkpoint that cannot be resumed from, named with the file at fault and what to do."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return RunDir(output_dir).checkpoints


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The checkpoint directories of a run, complete or not, oldest first: `stepNNNNNNNN` only, so that one moved
    aside (`step00000004.damaged`) is no longer one."""
    root = checkpoint_root(output_dir)
    return (
        sorted(p for p in root.glob("step*") if p.is_dir() and re.fullmatch(r"step\d+", p.name))
        if root.is_dir()
        else []
    )


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    """The file of one rank's own state: its note rows with their ids and its random streams."""
    return ckpt_dir / f"notes_rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class CheckpointMarker:
    """What COMPLETE holds: the checkpoint's step and progress, and what it was saved from (the one reader of it)."""

    step: int
    world_size: int
    notes: bool
    tokens: int = 0
    wall_time: float = 0.0
    rare_vocab_digest: str | None = None
    pipeline_stages: int = 1
    zero_stage: int | None = None
    trained_with: dict[str, Any] | None = None  # the RESUME_MUST_MATCH flags of the run that saved it

    @classmethod
    def read(cls, ckpt: Path) -> CheckpointMarker:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads((ckpt / COMPLETE).read_text()).items() if k in fields})

    def write(self, ckpt: Path) -> None:
        """Written last, atomically: a checkpoint without it is never resumed from."""
        (ckpt / f"{COMPLETE}.tmp").write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        (ckpt / f"{COMPLETE}.tmp").rename(ckpt / COMPLETE)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint directories that hold a COMPLETE marker, oldest first."""
    return [p for p in checkpoint_dirs(output_dir) if (p / COMPLETE).is_file()]


def superseded(complete: list[Path], keep: int, protected: Path | None) -> list[Path]:
    """The complete checkpoints (oldest first) beyond the `keep` newest (0: none are), but `protected`."""
    if keep == 0:
        return []
    return [ckpt for ckpt in complete[:-keep] if ckpt != protected]


def prune(output_dir: str | Path, keep: int, protected: Path | None) -> None:
    """Delete the superseded checkpoints and their universal forms: the marker first, so that a deletion cut short
    leaves a directory that is no longer a checkpoint, never one that looks complete and is not."""
    for ckpt in superseded(complete_checkpoints(output_dir), keep, protected):
        (ckpt / COMPLETE).unlink()
        shutil.rmtree(ckpt)
        shutil.rmtree(ckpt.parent / "universal" / ckpt.name, ignore_errors=True)


def latest_complete(output_dir: str | Path) -> Path | None:
    """The newest checkpoint directory that holds a COMPLETE marker, or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(ckpt: Path) -> list[Path]:
    """The files a manifest covers: everything in the checkpoint but the manifest and the COMPLETE marker."""
    return sorted(
        p
        for p in ckpt.rglob("*")
        if p.is_file() and p.name not in (MANIFEST, COMPLETE, f"{COMPLETE}.tmp", f"{MANIFEST}.tmp")
    )


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
    mine = {
        str(p.relative_to(ckpt)): {"sha256": sha256_of(p), "bytes": p.stat().st_size}
        for i, p in enumerate(files)
        if i % world_size == rank
    }
    entries = {name: entry for part in gather_from_ranks(mine) for name, entry in part.items()}
    if rank == 0:
        (ckpt / f"{MANIFEST}.tmp").write_text(json.dumps(dict(sorted(entries.items())), indent=1) + "\n")
        (ckpt / f"{MANIFEST}.tmp").rename(ckpt / MANIFEST)


def manifest_problems(ckpt: Path, rank: int, world_size: int) -> list[str]:
    """What differs between a checkpoint's files and its manifest (checked in parallel: entry i by rank i mod world),
    on every rank. Collective."""
    path = ckpt / MANIFEST
    if not path.is_file():  # written before COMPLETE: without it the checkpoint's files cannot be trusted
        return [f"{MANIFEST} is missing"]
    entries = sorted(json.loads(path.read_text()).items())
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
    kept = (
        f"the last complete checkpoint, {last_complete.name}, is intact"
        if last_complete
        else "no complete checkpoint exists yet"
    )
    fix = "free space or move --output_dir to a larger file system" if full else "fix the cause"
    return CheckpointError(f"writing checkpoint {ckpt} failed: {cause}; {kept} — {fix}, then rerun with --resume true.")


def save_checkpoint(
    engine, output_dir: str | Path, marker: CheckpointMarker, rank: int, rank_state: dict[str, torch.Tensor]
) -> Path:
    """Write a checkpoint of `marker.step` on every rank: DeepSpeed's files and this rank's `rank_state`; the manifest,
    then the marker, appear only after all files are written. A rank that cannot write raises CheckpointError (the
    others then fail in the next collective)."""
    root = checkpoint_root(output_dir)
    tag = tag_for(marker.step)
    ckpt = root / tag
    try:
        engine.save_checkpoint(str(root), tag=tag)
        save_file({k: v.contiguous() for k, v in rank_state.items()}, str(rank_file(ckpt, rank)))
    except (OSError, RuntimeError) as err:  # torch's writer reports a full disk as "unexpected pos ..."
        raise write_failure(err, ckpt, latest_complete(output_dir)) from None
    deepspeed.comm.barrier()
    write_manifest(ckpt, rank, marker.world_size)
    if rank == 0:
        marker.write(ckpt)
    deepspeed.comm.barrier()
    return ckpt


def read_rank_files(ckpt: Path, world_size: int, ranks: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Every rank's file of a checkpoint saved on `world_size` ranks (or those of `ranks`); a missing or unreadable one
    is refused by name."""
    states = []
    for rank in range(world_size) if ranks is None else ranks:
        path = rank_file(ckpt, rank)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {ckpt} is missing {path.name}; resume from an earlier complete checkpoint or start fresh."
            )
        try:
            states.append(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"checkpoint file {path} is truncated or corrupt ({err}); resume from an earlier checkpoint or "
                f"start fresh."
            ) from None
    return states


def check_note_rows(
    states: list[dict[str, torch.Tensor]], num_rare: int, ckpt: Path, share: tuple[int, int] | None = None
) -> None:
    """Every rare id 0..num_rare-1 must appear exactly once across the ranks' files; with `share` (rank, world size),
    the files are that rank's own, and every id the rank owns must."""
    ids = torch.sort(torch.cat([s["ids"] for s in states])).values
    expected = torch.arange(num_rare)
    if share is not None:
        expected = expected[owner_of(expected, share[1]) == share[0]]
    if not torch.equal(ids, expected):
        raise CheckpointError(
            f"checkpoint {ckpt} holds note rows that do not cover the rare vocabulary's {num_rare} words, each "
            f"needed exactly once{f' (rank {share[0]} of {share[1]})' if share else ''}; "
            "it belongs to other data or is damaged — resume with the data it was trained on, or from another "
            "checkpoint."
        )


@dataclass
class ResumePoint:
    """A complete checkpoint chosen for resuming, checked before any engine exists."""

    ckpt: Path
    marker: CheckpointMarker
    rank_files: dict[int, dict[str, torch.Tensor]]  # the rank files this rank read, by rank

    @property
    def step(self) -> int:
        return self.marker.step

    @property
    def world_size(self) -> int:
        return self.marker.world_size


def check_manifest(ckpt: Path, rank: int, world_size: int) -> None:
    """Refuse, naming the files at fault and offering the previous complete checkpoint, a checkpoint whose files differ
    from its manifest. Collective."""
    problems = manifest_problems(ckpt, rank, world_size)
    if not problems:
        return
    earlier = [p for p in complete_checkpoints(ckpt.parent.parent) if p.name < ckpt.name]
    offer = (
        f"the previous complete checkpoint is {earlier[-1].name}: move the damaged one aside (mv {ckpt} "
        f"{ckpt}.damaged) and "
        "rerun with --resume true to continue from it"
        if earlier
        else "no earlier complete checkpoint exists: start again with --overwrite true"
    )
    raise CheckpointError(f"checkpoint {ckpt} does not match its manifest ({'; '.join(problems[:3])}); {offer}.")


def plan_resume(
    output_dir: str | Path, rare_vocab_digest: str, num_rare: int | None, rank: int = 0, world_size: int = 1
) -> ResumePoint:
    """The newest complete checkpoint, its files checked against the manifest, then its note files read and validated
    (num_rare None: a baseline run). Collective when a process group exists."""
    ckpt = latest_complete(output_dir)
    if ckpt is None:
        raise CheckpointError(
            f"--resume found no complete checkpoint under {checkpoint_root(output_dir)}; drop --resume to "
            f"start a fresh run there."
        )
    check_manifest(ckpt, rank, world_size)
    marker = CheckpointMarker.read(ckpt)
    if marker.rare_vocab_digest != rare_vocab_digest:
        raise CheckpointError(
            f"checkpoint {ckpt} was trained with a different rare vocabulary than the data prepared now; "
            "resume with the same corpus, tokenizer and rare band."
        )
    # on the ranks that saved it, each rank's file holds exactly its own rows and streams: it reads that one alone
    same_ranks = marker.world_size == world_size
    ranks = [rank] if same_ranks else list(range(marker.world_size))
    rank_files = dict(zip(ranks, read_rank_files(ckpt, marker.world_size, ranks)))
    if num_rare is not None:
        if not marker.notes:
            raise CheckpointError(
                f"checkpoint {ckpt} comes from a --tnf off run and holds no notes; resume it with --tnf off."
            )
        share = (rank, world_size) if same_ranks and world_size > 1 else None  # one rank's file: its own ids
        try:
            check_note_rows(list(rank_files.values()), num_rare, ckpt, share)
            refusal = None
        except CheckpointError as err:
            refusal = str(err)
        refusals = [r for r in gather_from_ranks(refusal) if r]  # one rank's own rows at fault stops every rank
        if refusals:
            raise CheckpointError(refusals[0])
    return ResumePoint(ckpt, marker, rank_files)


def universal_form(ckpt: Path) -> Path:
    """DeepSpeed's universal form of `ckpt`, converted once and kept in checkpoints/universal/: it loads on any number
    of ranks, and holds every parameter's fp32 master weights (zero/NAME/fp32.pt) whatever optimizer wrote them."""
    target = ckpt.parent / "universal" / ckpt.name
    if not (target / COMPLETE).is_file():
        shutil.rmtree(target, ignore_errors=True)
        convert_to_universal(ckpt, target)
        (target.parent / "latest").write_text(ckpt.name)
        CheckpointMarker.read(ckpt).write(target)
    return target


class ConversionFailed(RuntimeError):
    """DeepSpeed's universal conversion raised; the message holds its own error and the end of what it printed."""


def convert_to_universal(ckpt: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal run in this process: no second interpreter to start, and its own error, not a
    subprocess's exit status, when it fails. One worker: its worker pool would fork a process that runs threads
    (gloo's, the prefetcher's). Its progress output is kept back, and shown only with a failure."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception as err:
        lines = said.getvalue().replace("\r", "\n").splitlines()
        printed = [line.strip() for line in lines if line.strip() and not re.search(r"\d+%\|", line)]  # no tqdm bars
        raise ConversionFailed(
            f"DeepSpeed's universal conversion of {ckpt} failed: {type(err).__name__}: {err} (its last words: "
            f"{' / '.join(printed[-3:]) or 'none'})"
        ) from err


def universal_checkpoint(point: ResumePoint, topo: Topology) -> Path:
    """The universal form of the planned checkpoint, converted by rank 0 while the others wait. Collective."""
    target = universal_form(point.ckpt) if topo.is_main else point.ckpt.parent / "universal" / point.ckpt.name
    wait_for_all(topo)
    return target


def union_of_ranks(rank_files: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's rows of a sharded state, concatenated (the rows of the note dictionary, whatever the partition);
    one file's rows as they are, not copied."""
    if len(rank_files) == 1:
        return {key: rank_files[0][key] for key in ("ids", "vectors", "noted")}
    return {key: torch.cat([f[key] for f in rank_files]) for key in ("ids", "vectors", "noted")}


class Checkpointer:
    """A run's checkpoints from start to end: the one owner of what a checkpoint holds and when one is written.

    Before the engine exists: `plan` (with --resume: the newest complete checkpoint, checked against the data and the
    config) and `adapt` (the DeepSpeed config that loads it: DeepSpeed's universal form when the ZeRO state was saved
    on another number of ranks). Then once at start, `start(engine, states)`: the components with resume state
    (`run_state.Stateful`, by name), loaded from the planned checkpoint. Then after every step, `save(step)`: it
    decides (every --save_interval steps, and always with `last`).
    """

    def __init__(
        self,
        run: RunDir,
        topo: Topology,
        rare_vocab: Path,
        num_rare: int | None,
        save_interval: int = 0,
        keep_checkpoints: int = 0,
    ):
        """`rare_vocab` is the data's rare vocabulary file (checkpoints must match it); `num_rare` is None without
        notes; `save_interval` 0 saves only when asked with `last`."""
        self.run, self.topo, self.num_rare, self.save_interval = run, topo, num_rare, save_interval
        self.keep_checkpoints = keep_checkpoints
        self.rare_vocab_digest = hashlib.sha256(rare_vocab.read_bytes()).hexdigest()[:16]
        self.point: ResumePoint | None = None
        self.source: Path | None = None  # what DeepSpeed loads: the checkpoint, or its universal form
        self.last_saved: int | None = None
        self.engine = None
        self.states: dict[str, Stateful] = {}
        self.trained_with: dict[str, Any] | None = None

    def plan(self, cfg: RunConfig) -> None:
        """With --resume, choose and validate the newest complete checkpoint against `cfg`; nothing is loaded and no run
        file is rewritten yet."""
        self.point = (
            plan_resume(self.run.path, self.rare_vocab_digest, self.num_rare, self.topo.rank, self.topo.size)
            if cfg.resume
            else None
        )
        self.source = self.point.ckpt if self.point else None
        self.trained_with = {name: getattr(cfg, name) for name in RESUME_MUST_MATCH}
        if self.point is None:
            return
        if cfg.max_steps < self.point.step:
            raise CheckpointError(
                f"checkpoint {self.point.ckpt} is at step {self.point.step}, beyond --max_steps {cfg.max_steps}; "
                f"pass --max_steps {self.point.step} or more to continue it."
            )
        saved = self.point.marker.trained_with or (
            self.run.read_run_config() if self.run.run_config.is_file() else None
        )
        if saved is None:
            raise CheckpointError(
                f"checkpoint {self.point.ckpt} does not record the flags it was trained with and {self.run.run_config} "
                "is missing, so the resume cannot check that the model matches it; restore run_config.json or start "
                "a new run elsewhere."
            )
        name = resume_conflict(saved, cfg)
        if name is not None:
            raise CheckpointError(
                f"the run in {self.run.path} was trained with --{name} {saved[name]}, not {getattr(cfg, name)}; "
                f"resume it with --{name} {saved[name]}, or start a new run elsewhere."
            )

    @property
    def last_complete_step(self) -> int | None:
        """The step of the newest complete checkpoint on disk: where a resume continues (None: there is none)."""
        latest = latest_complete(self.run.path)
        return CheckpointMarker.read(latest).step if latest else None

    def adapt(self, ds_config: dict[str, Any]) -> None:
        """Make `ds_config` able to load the planned checkpoint when it was saved on another topology."""
        point = self.point
        saved_stage, stage = (
            point.marker.zero_stage if point else None,
            ds_config.get("zero_optimization", {}).get("stage", 0),
        )
        if saved_stage is not None and saved_stage != stage and 3 in (saved_stage, stage):
            raise CheckpointError(
                f"checkpoint {point.ckpt} was saved with ZeRO stage {saved_stage} and this run uses stage {stage}; "
                f"DeepSpeed loads ZeRO-3 state only into ZeRO-3: resume with a stage {saved_stage} config "
                f"(e.g. ds_configs/zero{saved_stage}.json)."
            )
        saved = (point.marker.pipeline_stages, point.world_size) if point else None
        if point is None or saved == (self.topo.dims.pipeline, self.topo.size):
            return
        if saved[0] != self.topo.dims.pipeline:  # a stage's layer files hold its own layers: the split must match
            raise ConfigError(
                f"checkpoint {point.ckpt} was saved with {saved[0]} pipeline stage(s) and this run has "
                f"{self.topo.dims.pipeline}; resume it with a DeepSpeed config of {saved[0]} stage(s) (the number of "
                "data-parallel replicas may change)."
            )
        if self.topo.dims.pipeline > 1 or ds_config.get("zero_optimization", {}).get("stage", 0) > 0:
            self.source = universal_checkpoint(point, self.topo)
            ds_config["checkpoint"] = {"load_universal": True}

    def start(self, engine, states: dict[str, Stateful]) -> None:
        """Take the engine and the components whose state checkpoints hold; load them from the planned checkpoint."""
        self.engine, self.states = engine, states
        point = self.point
        if point is None:
            return
        mine = point.rank_files.get(self.topo.rank, {})
        saved = dataclasses.asdict(point.marker)
        for component in states.values():  # this rank's streams first: loading the engine draws no random numbers
            if getattr(component, "sharded_state", False):
                component.load_state_dict(union_of_ranks(list(point.rank_files.values())))
            else:
                component.load_state_dict({**saved, **mine})
        load_path, _ = engine.load_checkpoint(str(self.source.parent), tag=self.source.name)
        if load_path is None:
            raise CheckpointError(
                f"DeepSpeed could not load checkpoint {self.source}; its model or optimizer files are missing."
            )
        replay_cpu_adam_steps(engine.optimizer, self.topo.device)  # DeepSpeed's CPU Adam keeps state outside it
        self.last_saved = point.step
        self.point = dataclasses.replace(point, rank_files={})  # loaded: the rows need not stay in memory

    def save(self, step: int, last: bool = False) -> Path | None:
        """After step `step`: a complete checkpoint on every rank when the interval says so, or with `last` (the run's
        end, a stop) unless this step is saved already. Returns the checkpoint of this step, or None. Once it is
        complete, rank 0 deletes those beyond --keep_checkpoints. Collective."""
        if not last and not (self.save_interval and step % self.save_interval == 0):
            return None  # the common case, decided without looking at the file system
        if last and self.last_saved == step:
            latest = latest_complete(self.run.path)
            if latest is not None:
                return latest
        rank_state, plain = {}, {}
        for component in self.states.values():
            for key, value in component.state_dict().items():
                (rank_state if isinstance(value, torch.Tensor) else plain)[key] = value
        marker = CheckpointMarker(
            world_size=self.topo.size,
            notes=self.num_rare is not None,
            rare_vocab_digest=self.rare_vocab_digest,
            pipeline_stages=self.topo.dims.pipeline,
            zero_stage=self.engine.zero_optimization_stage(),
            trained_with=self.trained_with,
            **plain,
        )
        ckpt = save_checkpoint(self.engine, self.run.path, marker, self.topo.rank, rank_state)
        self.last_saved = step
        if self.topo.is_main:  # every rank has finished writing it: the older ones are no longer needed
            prune(self.run.path, self.keep_checkpoints, self.point.ckpt if self.point else None)
        return ckpt


def note_rows(ckpt: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, vectors) of the whole note dictionary in `ckpt`, gathered from every rank's file."""
    rows = union_of_ranks(read_rank_files(ckpt, CheckpointMarker.read(ckpt).world_size))
    return rows["ids"], rows["vectors"]
