"""Helpers the benchmark tools share: launch runs, check and read finished runs."""

from __future__ import annotations

import argparse
import statistics
import subprocess
from pathlib import Path

from tnf_scale.config import REPO
from tnf_scale.errors import ConfigError, Refusal
from tnf_scale.launch import TRAIN_SCRIPT, deepspeed_command
from tnf_scale.metrics import read_metrics, say_once
from tnf_scale.run_dir import RunDir
from tnf_scale.run_lock import RunLock, describe
from tnf_scale.settings import parse_bool


class TrainingFailed(Refusal):
    """A run a tool launched ended badly; it has said why, and the tool exits with its status."""


def add_overwrite_flag(parser: argparse.ArgumentParser) -> None:
    """The `--overwrite` of a tool that trains: whether it may replace runs already in its output folder."""
    parser.add_argument(
        "--overwrite",
        type=parse_bool,
        default=False,
        help="replace runs this tool finds already trained in its output folder (default: refuse)",
    )


def check_replaceable(run_dirs: list[Path], overwrite: bool) -> None:
    """Refuse, before anything is trained, to replace a run held in any of `run_dirs` unless --overwrite says so."""
    held = [str(run) for run in run_dirs if RunDir(run).holds_run()]
    if held and not overwrite:
        raise ConfigError(
            f"{', '.join(held)} already hold{'s' if len(held) == 1 else ''} a run; pass --overwrite true to replace "
            f"{'it' if len(held) == 1 else 'them'}, or choose another --out."
        )


def launch_training(
    run_dir: Path, ranks: int, port: int, flags: list[str], overwrite: bool, script: str = TRAIN_SCRIPT
) -> Path:
    """Run `script` (train.py, or the Hugging Face Trainer peer) under the real deepspeed launcher into `run_dir`,
    replacing a previous run there only with `overwrite`. A timing run logs every step, whatever the preset or `flags`
    say (bert-base logs every 100 steps: a short timing run would leave nothing to report)."""
    check_replaceable([run_dir], overwrite)
    args = ["--output_dir", str(run_dir), "--overwrite", str(overwrite).lower(), *flags, "--log_interval", "1"]
    status = subprocess.run(deepspeed_command(ranks, port, script, args), cwd=REPO).returncode
    if status:
        err = TrainingFailed(f"training into {run_dir} ended with exit status {status}; its own message is above.")
        err.exit_status = status
        raise err
    return run_dir


def timing_flags(preset: str, steps: int) -> list[str]:
    """train.py flags of a timing run: `steps` steps of `preset`, evaluated only at the start and the end, no export."""
    return ["--preset", preset, "--max_steps", str(steps), "--eval_interval", str(10 * steps), "--export", "false"]


def pair_dirs(out: Path) -> tuple[Path, Path]:
    """Where `launch_pair` trains the baseline and TNF."""
    return out / "baseline", out / "tnf"


def launch_pair(out: Path, ranks: int, port: int, flags: list[str], overwrite: bool) -> tuple[Path, Path]:
    """The baseline (--tnf off), then TNF, with the same flags, into out/baseline and out/tnf.

    One after the other, so neither run's wall time is shared with the other.
    """
    baseline, tnf = pair_dirs(out)
    check_replaceable([baseline, tnf], overwrite)
    return (
        launch_training(baseline, ranks, port, [*flags, "--tnf", "off"], overwrite),
        launch_training(tnf, ranks, port, [*flags, "--tnf", "on"], overwrite),
    )


def trial_plan(arms: list[str], trials: int) -> list[tuple[int, str]]:
    """(trial, arm) in the order to measure them: every arm once per trial, in the given order, then reversed, and so
    on (this machine's speed drifts: an arm always first would take the drift)."""
    return [(t, name) for t in range(trials) for name in (arms if t % 2 == 0 else arms[::-1])]


def finished_run(run_dir: str | Path, flag: str) -> Path:
    """`run_dir` if it holds a run's metrics with at least one record; otherwise one sentence naming the flag and the
    fix."""
    path = Path(run_dir)
    if not RunDir(path).metrics.is_file():
        raise ConfigError(
            f"{flag} {path} holds no run ({RunDir(path).metrics.name} is missing); point it at the "
            f"--output_dir of a training run."
        )
    if not read_metrics(path):
        raise ConfigError(f"{flag} {path} has logged nothing yet; report on it once it has trained a step.")
    holder = RunLock(RunDir(path).lock_file).live_holder()
    if holder is not None:
        say_once(f"warning: {path} is still training ({describe(holder)}); this covers the steps it has logged so far.")
    return path


def steady_steps(run_dir: Path, warmup: int) -> list[dict]:
    """Step records after the first `warmup` steps."""
    return [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > warmup]


def median_of(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)
