"""Where a run came from: the code's commit, the machine, the world size, when. Written beside every run."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator

REPO = Path(__file__).resolve().parent.parent
PROVENANCE_FILE = "provenance.json"


def machine() -> str:
    """One line naming this machine: CPU model and cores, torch build, accelerator."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, DeepSpeed accelerator {get_accelerator().device_name()}"


def commit() -> str:
    """The checkout's commit, marked when the working tree differs from it: which code produced a report."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes" if dirty else "")


def write_provenance(run_dir: Path, world_size: int) -> None:
    """provenance.json in `run_dir`: commit, machine, world size and start time of the run."""
    record = {"commit": commit(), "machine": machine(), "world_size": world_size,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (run_dir / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_provenance(run_dir: Path) -> dict:
    """A run's provenance.json, or an empty dict for a run written before it existed."""
    path = run_dir / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
