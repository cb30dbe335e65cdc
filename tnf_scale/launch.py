"""Starting ranks from Python: the deepspeed launcher's command line and a free local port (reports, tools, tests)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

TRAIN_SCRIPT = "tnf_scale/train.py"  # relative to the checkout, where launches run from
PEER_SCRIPT = "tnf_scale/reports/hf_peer.py"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher() -> str:
    """The `deepspeed` launcher installed beside this interpreter."""
    return str(Path(sys.executable).parent / "deepspeed")


def deepspeed_command(ranks: int, port: int, script: str, args: list[str]) -> list[str]:
    """`deepspeed --num_gpus RANKS --master_port PORT SCRIPT ARGS...` on this host."""
    return [deepspeed_launcher(), "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
