"""The lock on a run directory: one run at a time writes into an --output_dir.

Global rank 0 holds `<output_dir>/LOCK` for the run's lifetime. The file names its holder (host, PID,
SLURM job, command). A lock is stale, and taken over, when its holder is gone: a PID no longer alive on
this host (or alive as another process), or an earlier incarnation of this same SLURM job (a requeued
job runs again under its id, possibly on another node). A lock held from another host cannot be checked
from here: the refusal says how to clear it by hand once that run is known to be gone.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil

from tnf_scale.errors import ConfigError, Refusal


class RunDirLocked(Refusal):
    """Another live run holds the run directory."""


def this_holder() -> dict:
    """Who we are, as written into the lock."""
    me = psutil.Process()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": me.create_time(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def holder_is_gone(holder: dict) -> bool:
    """Whether the run that wrote `holder` can no longer be running (see the module doc)."""
    if holder.get("slurm_job") and holder["slurm_job"] == os.environ.get("SLURM_JOB_ID"):
        return True  # this job's earlier incarnation: the job itself is us now
    if holder.get("host") != socket.gethostname():
        return False
    try:
        alive = psutil.Process(int(holder["pid"]))
    except (psutil.NoSuchProcess, ValueError, KeyError, TypeError):
        return True
    started = holder.get("process_start")
    return started is not None and abs(alive.create_time() - float(started)) > 1.0  # the PID now names another process


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"PID {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


class RunLock:
    """`<output_dir>/LOCK`, created with its content in one step (a hard link), so it is never seen half written."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False
        self._created_dir = False

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def live_holder(self) -> dict | None:
        """Who holds the lock, when a run that may still be running does (None: free, or its holder is gone)."""
        holder = self._read() if self.path.exists() else {}
        return holder if holder and not holder_is_gone(holder) else None

    def acquire(self) -> None:
        """Take the lock, or raise RunDirLocked naming the live holder. Released by `release` or at interpreter exit."""
        directory = self.path.parent
        self._created_dir = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(
                f"cannot create --output_dir {directory} ({err.strerror}); choose a writable directory."
            ) from None
        if not os.access(directory, os.W_OK):
            raise ConfigError(
                f"cannot write into --output_dir {directory} (not writable); fix its permissions or choose "
                f"another directory."
            )
        me = this_holder()
        staging = directory / f".LOCK.{me['host']}.{me['pid']}"
        try:
            staging.write_text(json.dumps(me, indent=2) + "\n")
        except OSError as err:
            raise ConfigError(
                f"cannot write into --output_dir {directory} ({err.strerror}); "
                "choose a writable directory with free space."
            ) from None
        try:
            with open(directory / ".LOCK.guard", "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)  # two runs taking over the same stale lock: one at a time
                holder = self._read()
                if self.path.exists() and holder and not holder_is_gone(holder):
                    raise RunDirLocked(
                        f"--output_dir {directory} is in use by another run ({describe(holder)}: "
                        f"{holder.get('command', '?')}); "
                        f"wait for it to end or stop it, or choose another directory (if that run is gone, "
                        f"delete {self.path})."
                    )
                self.path.unlink(missing_ok=True)  # stale, or unreadable: its holder died before it finished writing
                os.link(staging, self.path)
        finally:
            staging.unlink(missing_ok=True)
        self.held = True
        atexit.register(self.release)

    def release(self) -> None:
        """Remove the lock if this process still holds it (and the directory, if the run created it and it is empty)."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        (self.path.parent / ".LOCK.guard").unlink(missing_ok=True)
        if self._created_dir:
            with contextlib.suppress(OSError):  # removed only when empty: a failed start leaves nothing behind
                self.path.parent.rmdir()
