"""Real cluster services on one host for the launcher tests: a private sshd for pdsh, a one-node SLURM.

Each starts only what is not running, in a private state folder, and stops what it started by PID.
Loopback addresses only. When a binary is missing (the set-up installs them: `make cluster-deps`)
the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from tnf_scale.launch import free_port


def require(*binaries: str) -> None:
    missing = [b for b in binaries if shutil.which(b) is None and not Path(b).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (run `make cluster-deps` as root)")


def _stop(pid_file: Path) -> None:
    if pid_file.is_file():
        pid = int(pid_file.read_text().split()[0])
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")
        time.sleep(0.2)


@contextmanager
def loopback_sshd(state: Path, hosts: tuple[str, ...] = ("127.0.0.2", "127.0.0.3")):
    """An sshd on `hosts` for root with a fresh key; yields (port, PDSH_SSH_ARGS_APPEND)."""
    require("/usr/sbin/sshd", "ssh-keygen", "pdsh")
    state.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)
    for key in ("id_ed25519", "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(state / key)], check=True)
    shutil.copy(state / "id_ed25519.pub", state / "authorized_keys")
    (state / "authorized_keys").chmod(0o600)
    port = free_port()
    config = [
        f"Port {port}",
        *(f"ListenAddress {h}" for h in hosts),
        f"HostKey {state / 'host_key'}",
        f"PidFile {state / 'sshd.pid'}",
        f"AuthorizedKeysFile {state / 'authorized_keys'}",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
    ]
    (state / "sshd_config").write_text("\n".join(config) + "\n")
    subprocess.run(["/usr/sbin/sshd", "-f", str(state / "sshd_config"), "-E", str(state / "sshd.log")], check=True)
    try:
        _wait_for((state / "sshd.pid").is_file, "sshd")
        ssh_args = (
            f"-i {state / 'id_ed25519'} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
        )
        yield port, ssh_args
    finally:
        _stop(state / "sshd.pid")


def _munged_running() -> bool:
    return subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0


@contextmanager
def local_slurm(state: Path):
    """slurmctld + slurmd (+ munged when none runs) for this host, configured by a private SLURM_CONF.

    Yields the environment (SLURM_CONF) the client commands need.
    """
    require("slurmctld", "slurmd", "sbatch", "munged", "mungekey")
    host = socket.gethostname().split(".")[0]
    for sub in ("ctld", "d", "log"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    mem_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) * 0.8 / 1024)
    conf = f"""ClusterName=tnftest
SlurmctldHost={host}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={state / "ctld"}
SlurmdSpoolDir={state / "d"}
SlurmctldPidFile={state / "slurmctld.pid"}
SlurmdPidFile={state / "slurmd.pid"}
SlurmctldLogFile={state / "log" / "slurmctld.log"}
SlurmdLogFile={state / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    (state / "slurm.conf").write_text(conf)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    started_munge = False
    if not _munged_running():
        key = Path("/etc/munge/munge.key")
        if not key.is_file() or key.stat().st_size == 0:
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started_munge = True
    try:
        subprocess.run(["slurmctld"], env=env, check=True)
        subprocess.run(["slurmd"], env=env, check=True)
        _wait_for(
            lambda: (
                subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
                == "idle"
            ),
            "the SLURM node",
        )
        yield env
    finally:
        _stop(state / "slurmd.pid")
        _stop(state / "slurmctld.pid")
        if started_munge:
            _stop(Path("/run/munge/munged.pid"))


def job_state(job: str, env: dict) -> dict[str, str]:
    """JobState, ExitCode, Restarts... of a job, from `scontrol show job`."""
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for_job(job: str, env: dict, timeout: float = 600.0) -> dict[str, str]:
    """Poll until the job has ended; returns its final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1.0)
    raise TimeoutError(f"SLURM job {job} still running after {timeout:.0f} s: {job_state(job, env)}")
