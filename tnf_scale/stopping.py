"""Clean stops: a stop signal to any rank, or the death of the launcher, stops every rank at the same step after a
checkpoint.

  SIGUSR1            SLURM's warning before a time limit or pre-emption: checkpoint, write PREEMPTED, exit 85
                     (the batch script requeues the job)
  SIGTERM, SIGINT    checkpoint, exit 86; a second one stops at once, without a checkpoint
  launcher gone      a watched ancestor (the `deepspeed` runner, its per-node launcher, torchrun, srun or
                     slurmstepd, mpirun) exited: as SIGTERM, so ranks never train on as orphans
"""

from __future__ import annotations

import signal
import sys
import threading

import psutil
import torch

from tnf_scale.distributed import all_reduce_sum
from tnf_scale.errors import PREEMPTED_EXIT, STOPPED_EXIT, rank_line

LAUNCHER_MARKS = (
    "deepspeed",
    "torchrun",
    "torch.distributed.run",
    "srun",
    "slurmstepd",
    "mpirun",
    "mpiexec",
    "orted",
    "prterun",
    "prted",
    "hydra_pmi_proxy",
    "pdsh",
)
LAUNCHER_POLL_SECONDS = 0.5  # a stat of /proc per watched process: cheap; a dead launcher is seen within a step


def is_launcher(process: psutil.Process) -> bool:
    """Whether a process is one of the launchers users start ranks with (by its name or command line)."""
    try:
        words = [process.name(), *process.cmdline()]
    except (psutil.Error, OSError):
        return False
    return any(mark in word.rsplit("/", 1)[-1] for word in words[:4] for mark in LAUNCHER_MARKS)


def launcher_chain() -> list[psutil.Process]:
    """This rank's ancestors up to the outermost launcher among them (none: the rank was started by hand)."""
    ancestors = psutil.Process().parents()
    outermost = max((i for i, p in enumerate(ancestors) if is_launcher(p)), default=-1)
    return ancestors[: outermost + 1]


class StopRequest:
    """Remembers why this rank was asked to stop; `reason` is None until then. The step loop asks every rank at each
    step boundary (one all-reduce: `agreed`) so that all stop together."""

    def __init__(self, launchers: list[psutil.Process] | None = None):
        """Handles the stop signals from now on and watches `launchers` (default: this rank's launcher chain)."""
        self.reason: str | None = None
        self.preempted = False
        for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        watched = launcher_chain() if launchers is None else launchers
        self._watch = [(p, p.name()) for p in watched]  # names kept: a dead process has none to ask for
        if self._watch:
            threading.Thread(target=self._watch_launcher, name="launcher-watch", daemon=True).start()

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum != signal.SIGUSR1:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once, without a checkpoint")
        self.preempted = self.preempted or signum == signal.SIGUSR1
        self.reason = self.reason or signal.Signals(signum).name
        again = "" if signum == signal.SIGUSR1 else "; send it again to stop at once, without a checkpoint"
        rank_line(
            f"{signal.Signals(signum).name}: stopping after a checkpoint at the next step boundary{again}", sys.stderr
        )

    def _watch_launcher(self) -> None:
        stop = threading.Event()
        while not stop.wait(LAUNCHER_POLL_SECONDS):
            gone = [(p, name) for p, name in self._watch if not p.is_running()]  # is_running also catches a reused PID
            if gone:
                self.reason = self.reason or f"its launcher ({gone[0][1]}, PID {gone[0][0].pid}) exited"
                return

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (one collective, at a step boundary); if so every rank also learns whether
        it was a pre-emption, so all exit alike."""
        pending, preempted = all_reduce_sum([float(self.reason is not None), float(self.preempted)], device)
        # Never lowered: a signal that arrived during the collective is handled as it returns, after this rank's share
        # was sent; its handler has already set the flag, and overwriting it with the sum would turn USR1 into exit 86.
        self.preempted = self.preempted or preempted > 0
        return pending > 0

    @property
    def exit_code(self) -> int:
        return PREEMPTED_EXIT if self.preempted else STOPPED_EXIT
