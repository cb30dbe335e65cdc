"""The fault campaign: interrupt a multi-rank TNF run with a fault, resume it, and compare it with an uninterrupted run.

A fault is a signal sent to one process at one moment:
  KILL@rank, TERM@rank, INT@rank, USR1@rank   to a random training rank, at a random step
  KILL@checkpoint                             SIGKILL to a random rank while the first checkpoint after a random step
                                              is being written
  KILL@launcher, TERM@launcher                to the `deepspeed` runner: the ranks must stop, not train on as orphans
After the fault the launcher must end with no rank left running, and after a stop signal or the launcher's death
every rank must say it stopped at the checkpointed step with the stop's exit code; the run is then resumed to the end
(from its newest complete checkpoint; afresh when none was completed), and its per-step losses and final note
dictionary must match the reference within the tolerance, with every step logged exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tnf_scale.checkpoint import COMPLETE, CheckpointMarker, checkpoint_dirs, complete_checkpoints
from tnf_scale.config import REPO
from tnf_scale.errors import PREEMPTED_EXIT, STOPPED_EXIT
from tnf_scale.launch import TRAIN_SCRIPT, deepspeed_command
from tnf_scale.metrics import read_metrics
from tnf_scale.run_dir import RunDir

FAULTS = ("KILL@rank", "TERM@rank", "INT@rank", "USR1@rank", "KILL@checkpoint", "KILL@launcher", "TERM@launcher")
RANK_STOP_SECONDS = 120  # a faulted run's ranks must all be gone by then


@dataclass
class Trial:
    """One fault and what came of it."""

    number: int
    fault: str
    ranks: int
    target: str = ""
    at_step: int = 0  # the last step logged when the signal was sent
    exit_code: int | None = None  # the launcher's
    orphans: int = 0  # ranks still running RANK_STOP_SECONDS after the fault
    resumed_from: int | None = None  # step of the checkpoint the second launch continued from (None: started afresh)
    max_rel_diff: float = float("inf")  # over every step's loss
    steps_logged_once: bool = False
    notes_lost: int = -1  # rare ids missing from, or differing in, the final note dictionary
    last_words: str = ""
    stops: list[list[int]] = field(default_factory=list)  # [rank, step, exit code] each rank said it stopped with
    finished_first: bool = False  # the run had trained every step and exported before the fault reached its ranks

    @property
    def stopped_together(self) -> bool | None:
        """A stop signal or a dead launcher: whether every rank said it stopped at the checkpointed step with the
        stop's exit code (None: a fault that kills a rank, which cannot say so, or a run that had finished)."""
        if (self.fault.startswith("KILL@") and self.fault != "KILL@launcher") or (
            self.finished_first and not self.stops
        ):
            return None
        code = PREEMPTED_EXIT if self.fault.startswith("USR1") else STOPPED_EXIT
        return sorted(self.stops) == [[rank, self.resumed_from, code] for rank in range(self.ranks)]

    @property
    def identical(self) -> bool:
        return (
            self.orphans == 0
            and self.steps_logged_once
            and self.notes_lost == 0
            and self.max_rel_diff <= TOLERANCE
            and self.stopped_together is not False
        )


TOLERANCE = 1e-5


def launcher_command(run_dir: Path, ranks: int, port: int, flags: list[str], resume: bool) -> list[str]:
    start = ["--resume", "true"] if resume else ["--overwrite", "true"]
    return deepspeed_command(ranks, port, TRAIN_SCRIPT, ["--output_dir", str(run_dir), *start, *flags])


def run_to_end(run_dir: Path, ranks: int, port: int, flags: list[str], resume: bool, log: Path) -> int:
    with log.open("a") as out:
        return subprocess.run(
            launcher_command(run_dir, ranks, port, flags, resume), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        ).returncode


def rank_processes(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The training ranks under a launcher, by rank (one node: local rank = rank)."""
    ranks = {}
    for child in launcher.children(recursive=True):
        try:
            local = [a for a in child.cmdline() if a.startswith("--local_rank=")]
        except psutil.Error:
            continue
        if local:
            ranks[int(local[0].split("=", 1)[1])] = child
    return ranks


def last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run_dir) if "loss" in r), default=0)
    except (OSError, ValueError):
        return 0  # a line being written


def wait_for(condition, timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def checkpoint_in_progress(run_dir: Path) -> bool:
    return any(not (p / COMPLETE).exists() for p in checkpoint_dirs(run_dir))


def inject(
    trial: Trial, run_dir: Path, ranks: int, port: int, flags: list[str], max_steps: int, rng: random.Random, log: Path
) -> None:
    """Start the run, send the trial's fault, and wait for every process of the run to end."""
    kind, where = trial.fault.split("@")
    with log.open("a") as out:
        launcher = subprocess.Popen(
            launcher_command(run_dir, ranks, port, flags, resume=False),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    runner = psutil.Process(launcher.pid)
    goal = rng.randint(1, max_steps - 2)
    wait_for(lambda: last_step(run_dir) >= goal or launcher.poll() is not None, 600, 0.05)
    if where == "checkpoint":  # the next checkpoint being written after that step
        wait_for(lambda: checkpoint_in_progress(run_dir) or launcher.poll() is not None, 600, 0.002)
    trial.at_step = last_step(run_dir)
    processes = rank_processes(runner) if launcher.poll() is None else {}
    if where == "launcher":
        target = runner
        trial.target = f"launcher PID {runner.pid}"
    else:
        rank = rng.choice(sorted(processes)) if processes else -1
        target = processes.get(rank)
        trial.target = f"rank {rank}"
    if target is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            target.send_signal(getattr(signal, f"SIG{kind}"))
    try:
        trial.exit_code = launcher.wait(timeout=RANK_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        trial.exit_code = None
    _, alive = psutil.wait_procs(list(processes.values()), timeout=RANK_STOP_SECONDS)
    trial.orphans = len(alive)
    for process in alive:  # ours, started above: never leave them running
        process.kill()
    with contextlib.suppress(
        ProcessLookupError
    ):  # and whatever else of this launch is left (an orphaned node launcher)
        os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()


def compare(trial: Trial, run_dir: Path, reference: Path) -> None:
    """Fill the trial's verdict from its finished run and the reference."""
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    expected = {r["step"]: r["loss"] for r in read_metrics(reference) if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    trial.steps_logged_once = sorted(steps) == sorted(expected) and len(steps) == len(set(steps))
    diffs = [abs(got[s] - v) / max(abs(v), 1e-12) for s, v in expected.items() if s in got]
    trial.max_rel_diff = max(diffs) if len(diffs) == len(expected) else float("inf")
    ref_notes, notes_path = load_file(str(RunDir(reference).notes)), RunDir(run_dir).notes
    if not notes_path.is_file():
        trial.notes_lost = len(ref_notes["ids"])
        return
    notes = load_file(str(notes_path))
    got_rows = dict(zip(notes["ids"].tolist(), notes["vectors"]))
    lost = 0
    for rare_id, vector in zip(ref_notes["ids"].tolist(), ref_notes["vectors"]):
        row = got_rows.get(rare_id)
        lost += row is None or not torch.allclose(row, vector, rtol=TOLERANCE, atol=1e-6)
    trial.notes_lost = lost


def last_words_in(log: Path) -> str:
    lines = [
        line.strip()
        for line in log.read_text(errors="replace").splitlines()
        if "stopping after a failure" in line or "exiting with" in line
    ]
    return lines[0][:200] if lines else ""


STOP_LINE = re.compile(r"rank (\d+): stopped at step (\d+), exit (\d+)$")


def stops_in(log: Path) -> list[list[int]]:
    """[rank, step, exit code] of every rank's stop line in a launch's log (train.stop_cleanly)."""
    lines = log.read_text(errors="replace").splitlines()
    return [[int(n) for n in match.groups()] for match in map(STOP_LINE.search, lines) if match]


def run_trial(
    number: int,
    fault: str,
    out: Path,
    reference: Path,
    ranks: int,
    port: int,
    flags: list[str],
    max_steps: int,
    rng: random.Random,
) -> Trial:
    trial = Trial(number, fault, ranks)
    run_dir, log = out / f"trial{number:02d}", out / f"trial{number:02d}.log"
    log.unlink(missing_ok=True)
    inject(trial, run_dir, ranks, port, flags, max_steps, rng, log)
    trial.last_words, trial.stops = last_words_in(log), stops_in(log)
    done = complete_checkpoints(run_dir)
    trial.resumed_from = CheckpointMarker.read(done[-1]).step if done else None
    trial.finished_first = trial.resumed_from == max_steps and RunDir(run_dir).notes.is_file()
    if not trial.finished_first:
        run_to_end(run_dir, ranks, port, flags, resume=bool(done), log=log)
    compare(trial, run_dir, reference)
    return trial


def table(trials: list[Trial]) -> str:
    rows = [
        "| # | fault | target | signalled after step | launcher exit | every rank stopped there | orphans | "
        "resumed from | max rel. loss diff | steps once | notes lost | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in trials:
        together = {None: "n/a", True: "yes", False: "NO"}[t.stopped_together]
        rows.append(
            f"| {t.number} | {t.fault} | {t.target} | {t.at_step} | {t.exit_code} | {together} | {t.orphans} | "
            f"{'fresh start' if t.resumed_from is None else t.resumed_from} | {t.max_rel_diff:.1e} | "
            f"{'yes' if t.steps_logged_once else 'NO'} | {t.notes_lost} | {'identical' if t.identical else 'DIFFERS'} |"
        )
    return "\n".join(rows)


def summary(trials: list[Trial]) -> str:
    same = sum(t.identical for t in trials)
    lost = sum(max(t.notes_lost, 0) for t in trials)
    orphans = sum(t.orphans for t in trials)
    return f"{same}/{len(trials)} identical within {TOLERANCE:g}, {lost} notes lost, {orphans} orphaned ranks"


def write_report(out: Path, trials: list[Trial], command: str) -> str:
    text = f"# Fault campaign\n\n`{command}`\n\n{table(trials)}\n\n**{summary(trials)}**\n"
    (out / "fault_campaign.md").write_text(text)
    (out / "fault_campaign.json").write_text(
        json.dumps(
            [{**asdict(t), "stopped_together": t.stopped_together, "identical": t.identical} for t in trials], indent=1
        )
        + "\n"
    )
    return text
