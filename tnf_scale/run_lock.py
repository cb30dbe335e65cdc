"""The lock on a run directory: one run at a time writes into an --output_dir.

Global rank 0 holds `<output_dir>/LOCK` for the run's lifetime. The file names its holder (host, PID,
SLURM job, command) and the lease it keeps: the holder renews the file's time every RENEW_SECONDS. A lock is
stale, and taken over with a line that says why, when its holder is gone:
- an earlier incarnation of this same SLURM job (a requeued job runs again under its id, possibly on another node);
- on this host, a PID no longer alive (or alive as another process);
- a SLURM job that SLURM says no longer runs (a resubmitted job finding the lock of one that was killed);
- a lease not renewed for LEASE_SECONDS, from any host (the holder's node died; or a run killed on another host).
A live holder on another host keeps renewing its lease, so it is never taken over; a lock that cannot be judged
(another host, no lease recorded, no SLURM to ask) is refused with how to clear it by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tnf_scale.errors import ConfigError, Refusal

LEASE_SECONDS = 900  # a lock whose holder has not renewed it for this long is stale, whatever its host
RENEW_SECONDS = 60
# SLURM job states in which the job's processes may still be writing (a COMPLETING job's may be checkpointing)
SLURM_RUNNING = ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "CONFIGURING", "RESIZING")


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
        "lease_seconds": LEASE_SECONDS,
    }


def slurm_job_state(job: str) -> str | None:
    """SLURM's state of job `job` ("" when SLURM no longer knows it), or None when there is no SLURM to ask."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:  # a job purged from the controller: "Invalid job id specified"
        return "" if "Invalid job id" in proc.stderr else None
    return proc.stdout.strip()


def why_gone(holder: dict, renewed: float) -> str | None:
    """Why the run that wrote `holder` (its lock last renewed at `renewed`, a time stamp) can no longer be running,
    or None when it may be (see the module doc)."""
    job = holder.get("slurm_job")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        return f"an earlier run of this SLURM job {job}"  # the job itself is us now
    if holder.get("host") == socket.gethostname():
        try:
            alive = psutil.Process(int(holder["pid"]))
        except (psutil.NoSuchProcess, ValueError, KeyError, TypeError):
            return f"PID {holder.get('pid')} no longer runs on this host"
        started = holder.get("process_start")
        if started is not None and abs(alive.create_time() - float(started)) > 1.0:
            return f"PID {holder['pid']} now names another process"
        return None
    if job:
        state = slurm_job_state(job)
        if state is not None and state not in SLURM_RUNNING:
            return f"SLURM says job {job} {'is ' + state if state else 'no longer exists'}"
    lease = holder.get("lease_seconds")
    idle = time.time() - renewed
    if lease and idle > lease:
        return f"its holder last renewed it {idle / 60:.0f} minutes ago (the lease is {lease / 60:.0f})"
    return None


def describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    started = f", started {holder['started']}" if holder.get("started") else ""
    return f"PID {holder.get('pid')} on {holder.get('host')}{job}{started}"


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

    def _why_gone(self, holder: dict) -> str | None:
        try:
            renewed = self.path.stat().st_mtime
        except OSError:
            return "it was removed meanwhile"
        return why_gone(holder, renewed)

    def live_holder(self) -> dict | None:
        """Who holds the lock, when a run that may still be running does (None: free, or its holder is gone)."""
        holder = self._read() if self.path.exists() else {}
        return holder if holder and self._why_gone(holder) is None else None

    def acquire(self, log=lambda _: None) -> None:
        """Take the lock, or raise RunDirLocked naming the live holder; a stale lock taken over is said through `log`.
        Renewed while held; released by `release` or at interpreter exit."""
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
                gone = self._why_gone(holder) if self.path.exists() and holder else None
                if self.path.exists() and holder and gone is None:
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
        if gone:
            log(f"took over {self.path} from {describe(holder)}: {gone}")
        self.held = True
        self._renewing = threading.Event()
        threading.Thread(target=self._renew, args=(self._renewing, me), daemon=True, name="run-lock-lease").start()
        atexit.register(self.release)

    def _renew(self, stop: threading.Event, me: dict) -> None:
        """Keep the lease: touch the lock every RENEW_SECONDS while it is still this process's."""
        while not stop.wait(RENEW_SECONDS):
            holder = self._read()
            if holder.get("pid") != me["pid"] or holder.get("host") != me["host"]:
                return
            with contextlib.suppress(OSError):  # a file system that hiccups: the next renewal tries again
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock if this process still holds it (and the directory, if the run created it and it is empty)."""
        if not self.held:
            return
        self.held = False
        self._renewing.set()
        holder = self._read()
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        (self.path.parent / ".LOCK.guard").unlink(missing_ok=True)
        if self._created_dir:
            with contextlib.suppress(OSError):  # removed only when empty: a failed start leaves nothing behind
                self.path.parent.rmdir()
