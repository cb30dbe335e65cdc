"""Helpers the benchmark tools share: launch runs, check and read finished runs."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from tnf_scale.config import REPO
from tnf_scale.errors import ConfigError
from tnf_scale.launch import TRAIN_SCRIPT, deepspeed_command
from tnf_scale.metrics import read_metrics
from tnf_scale.run_dir import RunDir


def launch_training(run_dir: Path, ranks: int, port: int, flags: list[str], script: str = TRAIN_SCRIPT) -> Path:
    """Run `script` (train.py, or the Hugging Face Trainer peer) under the real deepspeed launcher into `run_dir`,
    replacing a previous run there. A timing run logs every step, whatever the preset or `flags` say (bert-base logs
    every 100 steps: a short timing run would leave nothing to report)."""
    args = ["--output_dir", str(run_dir), "--overwrite", "true", *flags, "--log_interval", "1"]
    subprocess.run(deepspeed_command(ranks, port, script, args), cwd=REPO, check=True)
    return run_dir


def timing_flags(preset: str, steps: int) -> list[str]:
    """train.py flags of a timing run: `steps` steps of `preset`, evaluated only at the start and the end, no export."""
    return ["--preset", preset, "--max_steps", str(steps), "--eval_interval", str(10 * steps), "--export", "false"]


def launch_pair(out: Path, ranks: int, port: int, flags: list[str]) -> tuple[Path, Path]:
    """The baseline (--tnf off), then TNF, with the same flags, into out/baseline and out/tnf.

    One after the other, so neither run's wall time is shared with the other.
    """
    return (
        launch_training(out / "baseline", ranks, port, [*flags, "--tnf", "off"]),
        launch_training(out / "tnf", ranks, port, [*flags, "--tnf", "on"]),
    )


def finished_run(run_dir: str | Path, flag: str) -> Path:
    """`run_dir` if it holds a run's metrics; otherwise one sentence naming the flag and the fix."""
    path = Path(run_dir)
    if not RunDir(path).metrics.is_file():
        raise ConfigError(
            f"{flag} {path} holds no run ({RunDir(path).metrics.name} is missing); point it at the "
            f"--output_dir of a training run."
        )
    return path


def steady_steps(run_dir: Path, warmup: int) -> list[dict]:
    """Step records after the first `warmup` steps."""
    return [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > warmup]


def median_of(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)
