"""A run directory: the name of every artifact in it, the check before a run starts there, and the files that
say what the run was (run and model configuration, tokenizer with rare vocabulary, provenance).

Layout of `--output_dir`:
  metrics.jsonl, tensorboard/     per-step records (metrics.py)
  checkpoints/stepNNNNNNNN/       DeepSpeed state, note rows per rank, COMPLETE (checkpoint.py)
  export/                         the plain Hugging Face model (model/export.py); ELECTRA: the discriminator,
                                  with the generator in export/generator/
  notes.safetensors               the note dictionary on its own
  tokenizer/ (rare_vocab.tsv)     the run's tokenizer and rare vocabulary; also the layout of a prepared-data entry
  model_config.json, run_config.json, provenance.json; ELECTRA: model_config.json is the discriminator's,
                                  beside generator_config.json
  PREEMPTED                       written when a signal stopped the run after a checkpoint
  LOCK                            held by global rank 0 while a run writes here (run_lock.py)
  failures/                       what each rank saw when a rank failed, for the survivors' last words (failures.py)
  hf_trainer/                     only in a run of the Hugging Face Trainer peer (reports/hf_peer.py): its own output
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.config import REPO, RunConfig
from tnf_scale.data.tokenizer import load_tokenizer
from tnf_scale.distributed import Topology, wait_for_all
from tnf_scale.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
EXPORT_DIR = "export"
NOTES_FILE = "notes.safetensors"
TOKENIZER_DIR = "tokenizer"
RARE_VOCAB_FILE = "rare_vocab.tsv"
MODEL_CONFIG = "model_config.json"
GENERATOR_CONFIG = "generator_config.json"
RUN_CONFIG = "run_config.json"
PROVENANCE_FILE = "provenance.json"
PREEMPTED_MARKER = "PREEMPTED"
LOCK_FILE = "LOCK"
FAILURES_DIR = "failures"
HF_TRAINER_DIR = "hf_trainer"
WANDB_ID_FILE = "wandb_id"  # the Weights & Biases run a resume continues
WANDB_DIR = "wandb"  # the W&B client's own files (offline runs wait there to be synced)
TRAINED = (
    METRICS_FILE,
    TENSORBOARD_DIR,
    CHECKPOINTS_DIR,
    EXPORT_DIR,
    NOTES_FILE,
    WANDB_ID_FILE,
    WANDB_DIR,
)  # any of them: the directory holds a run (and --overwrite deletes them)


def check_out_dir(path: str | Path, flag: str) -> Path:
    """`path` as a folder to write into, refused in one sentence when it, or the nearest part of it that exists, is a
    file or cannot be written: checked before anything is written there."""
    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file; name a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to.")
    return path


class RunDir:
    """The artifacts of one run, by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def export(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def notes(self) -> Path:
        return self.path / NOTES_FILE

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def model_config(self) -> Path:
        return self.path / MODEL_CONFIG

    @property
    def generator_config(self) -> Path:
        return self.path / GENERATOR_CONFIG

    @property
    def run_config(self) -> Path:
        return self.path / RUN_CONFIG

    @property
    def provenance(self) -> Path:
        return self.path / PROVENANCE_FILE

    @property
    def preempted(self) -> Path:
        return self.path / PREEMPTED_MARKER

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def failures(self) -> Path:
        return self.path / FAILURES_DIR

    @property
    def rare_vocab(self) -> Path:
        return self.tokenizer / RARE_VOCAB_FILE

    @property
    def hf_trainer(self) -> Path:
        return self.path / HF_TRAINER_DIR

    def _trained(self) -> list[str]:
        return [name for name in TRAINED if (self.path / name).exists()]

    def holds_run(self) -> bool:
        """Whether a run has trained here (metrics, checkpoints, export or notes exist)."""
        return bool(self._trained())

    def _ours(self) -> bool:
        """Whether this project wrote the directory's run: its run files are there (a run that started training has
        written them before any metric, checkpoint or export)."""
        return self.run_config.is_file() or self.provenance.is_file()

    def check(self, cfg: RunConfig) -> None:
        """Refuse to mix a new run into an old one unless --resume or --overwrite says what to do, and refuse to
        overwrite what another tool wrote. Touches nothing."""
        existing = self._trained()
        if existing and cfg.overwrite and not cfg.resume and not self._ours():
            raise ConfigError(
                f"--output_dir {self.path} holds {', '.join(existing)} but no run of this project (no "
                f"{RUN_CONFIG} or {PROVENANCE_FILE}), so --overwrite will not delete them; choose another directory."
            )
        if existing and not cfg.resume and not cfg.overwrite:
            raise ConfigError(
                f"--output_dir {self.path} already holds a run ({existing[0]}); pass --resume to continue it, "
                "--overwrite to replace it, or choose another directory."
            )
        check_out_dir(self.path, "--output_dir")

    def own_tokenizer(self, cfg: RunConfig) -> Path | None:
        """On a resume, the tokenizer this run was trained with, which its data must be encoded with (None: not a
        resume, or a run that never wrote one). A --tokenizer given beside it must hold the same vocabulary."""
        if not cfg.resume or not (self.tokenizer / "tokenizer.json").is_file():
            return None
        if cfg.tokenizer and load_tokenizer(cfg.tokenizer).get_vocab() != load_tokenizer(self.tokenizer).get_vocab():
            raise ConfigError(
                f"--tokenizer {cfg.tokenizer} is not the tokenizer run {self.path} was trained with; drop --tokenizer "
                f"to resume with the run's own ({self.tokenizer})."
            )
        return self.tokenizer

    def claim(self, cfg: RunConfig, topo: Topology) -> None:
        """Create the directory; with --overwrite (and not --resume), delete the old run first. Call it only once every
        input has been checked. Collective: every rank has looked before rank 0 deletes anything. The waits are on the
        control group: deleting a large old run on a network file system can outlast NCCL's watchdog."""
        wait_for_all(topo)
        if topo.is_main:
            if cfg.overwrite and not cfg.resume:
                for name in self._trained():
                    target = self.path / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.failures, ignore_errors=True)  # an earlier attempt's records would confuse this one's
        wait_for_all(topo)

    def write_run_files(
        self,
        cfg: RunConfig,
        model_config,
        tokenizer_dir: Path | None,
        world_size: int,
        details: dict,
        generator_config=None,
    ) -> None:
        """Tokenizer (with rare vocabulary), model config(s), run config and provenance (with `details`: the precision
        the run computes in and the device it runs on): what the run was, beside its metrics, so that export and the
        reports need only the run directory. `tokenizer_dir` None (a resume) keeps the run's own, which its
        checkpoints were trained with."""
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, self.tokenizer, dirs_exist_ok=True)
        model_config.to_json_file(str(self.model_config))
        if generator_config is not None:
            generator_config.to_json_file(str(self.generator_config))
        self.run_config.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        record = {
            "commit": commit(),
            "machine": machine(),
            "world_size": world_size,
            **details,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        self.provenance.write_text(json.dumps(record, indent=2) + "\n")

    def read_run_config(self) -> dict:
        return json.loads(self.run_config.read_text())

    def read_model_config(self) -> dict:
        return json.loads(self.model_config.read_text())

    def caption(self) -> str:
        """What a plot of this run says it shows: preset, seed, commit (from the run's own files)."""
        config = self.read_run_config() if self.run_config.is_file() else {}
        origin = self.read_provenance() if self.provenance.is_file() else {}
        return (
            f"preset {config.get('preset', 'unknown')}, seed {config.get('seed', 'unknown')}, "
            f"commit {origin.get('commit', 'unknown')}"
        )

    def read_provenance(self) -> dict:
        """provenance.json, or an empty dict for a run written before it existed."""
        return json.loads(self.provenance.read_text()) if self.provenance.is_file() else {}


def machine() -> str:
    """One line naming this machine: CPU model and cores, torch build, accelerator."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, DeepSpeed accelerator "
        f"{get_accelerator().device_name()}"
    )


def commit() -> str:
    """The checkout's commit, marked when the working tree differs from it: which code produced a run."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")
