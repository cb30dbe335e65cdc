"""Helpers the benchmark tools share: launch a training run, read its steady-state steps."""
from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from tnf_scale.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent


def launch_training(run_dir: Path, ranks: int, port: int, flags: list[str]) -> Path:
    """Train `tnf_scale/train.py` under the real deepspeed launcher into `run_dir` (replacing a previous run)."""
    args = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(port),
            "tnf_scale/train.py", "--output_dir", str(run_dir), "--overwrite", "true", *flags]
    subprocess.run(args, cwd=REPO, check=True)
    return run_dir


def steady_steps(run_dir: Path, warmup: int) -> list[dict]:
    """Step records after the first `warmup` steps."""
    return [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > warmup]


def median_of(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)
