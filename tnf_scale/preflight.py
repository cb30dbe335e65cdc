"""Checks to run before a multi-node launch (`tnf-preflight --hostfile hosts [--deepspeed_config F]`).

Each problem is one sentence naming it and the fix; exit code 2 when there is one.
(The world-size, pipeline and master-port checks also run inside train.py before any process group.)
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import psutil

from tnf_scale.ds_config import load_ds_file, pipeline_stages
from tnf_scale.errors import ConfigError
from tnf_scale.stopping import launcher_chain

HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")  # the form DeepSpeed's runner accepts


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per line of a DeepSpeed hostfile; blank lines and # comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"hostfile {path} does not exist; write one line per node: '<host> slots=<GPUs>'.")
    hosts = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            raise ConfigError(
                f"hostfile {path} line {number} {raw.strip()!r} is not '<host> slots=<N>'; fix that line."
            )
        if int(match[2]) < 1:
            raise ConfigError(f"hostfile {path} line {number} gives {match[1]} no slots; give it slots=1 or more.")
        if match[1] in (host for host, _ in hosts):
            raise ConfigError(
                f"hostfile {path} names {match[1]} twice (line {number}); give each node one line with all its slots."
            )
        hosts.append((match[1], int(match[2])))
    if not hosts:
        raise ConfigError(f"hostfile {path} names no host; write one line per node: '<host> slots=<GPUs>'.")
    return hosts


def check_hosts_resolve(hosts: list[tuple[str, int]], path: str | Path) -> None:
    for host, _ in hosts:
        try:
            socket.getaddrinfo(host, None)
        except socket.gaierror:
            raise ConfigError(
                f"host {host!r} in hostfile {path} does not resolve; fix the name or add it to /etc/hosts."
            ) from None


def check_slots(hosts: list[tuple[str, int]], pipeline_stages: int, path: str | Path) -> None:
    total = sum(slots for _, slots in hosts)
    if total % pipeline_stages:
        raise ConfigError(
            f"hostfile {path} gives {total} slots, which do not divide into {pipeline_stages} pipeline stages; "
            f"use a multiple of {pipeline_stages} slots."
        )


def runner_hostfile(cmdline: list[str]) -> str | None:
    """The --hostfile (-H) a `deepspeed` runner command line names, or None."""
    for i, word in enumerate(cmdline):
        if word.startswith("--hostfile="):
            return word.split("=", 1)[1]
        if word in ("--hostfile", "-H") and i + 1 < len(cmdline):
            return cmdline[i + 1]
    return None


def check_runner_hostfile() -> None:
    """Refuse a launch whose `deepspeed` runner was given a hostfile that does not exist: the runner then warns and
    starts this node's ranks alone, and a multi-node job would quietly train on one node."""
    for process in launcher_chain():
        try:
            cmdline, cwd = process.cmdline(), process.cwd()
        except (psutil.Error, OSError):
            continue
        if not any(word.rsplit("/", 1)[-1] == "deepspeed" for word in cmdline[:2]):
            continue
        hostfile = runner_hostfile(cmdline)
        if hostfile is not None and not (Path(cwd) / hostfile).is_file():
            raise ConfigError(
                f"deepspeed was given --hostfile {hostfile}, which does not exist, so it started this node's ranks "
                "alone; fix the path (check it with python -m tnf_scale.preflight --hostfile FILE)."
            )


def preflight(hostfile: str, deepspeed_config: str | None) -> list[tuple[str, int]]:
    """All hostfile checks; returns the hosts when they pass."""
    hosts = read_hostfile(hostfile)
    check_hosts_resolve(hosts, hostfile)
    check_slots(
        hosts, pipeline_stages(load_ds_file(deepspeed_config), f"--deepspeed_config {deepspeed_config}"), hostfile
    )
    return hosts
