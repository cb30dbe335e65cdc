"""Runs the check's steps, each under its own timeout, and rewrites the report after every step, so a call cut off
from outside still leaves what it measured. No step starts after `start_by`; none runs past `end_by`."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

NOISE = ("real_accelerator", "it/s]", "s/it]", "\r")  # DeepSpeed's accelerator banner, progress bars
STARTUP_MARK = "; optimizer "  # train.py's start-up line names the world, optimizer, precision and TNF
TAIL = 12


@dataclass
class Job:
    """A command started in the background at once (a build, a data preparation); steps may wait for it."""

    name: str
    title: str
    argv: list[str]
    timeout: float


@dataclass
class Step:
    """One step of the check. `skip`: why it does not run on this node ("": it runs). `waits_for`: jobs to finish
    first. `job`: instead of a command, report that background job's outcome. `shows`: files of figures the step
    writes, shown in the report."""

    title: str
    argv: list[str] = field(default_factory=list)
    timeout: float = 60
    skip: str = ""
    waits_for: tuple[str, ...] = ()
    job: str = ""
    shows: tuple[Path, ...] = ()


@dataclass
class Outcome:
    title: str
    status: str  # ok | FAILED (exit N) | TIMED OUT | skipped: why | cut: why | running
    seconds: float
    timeout: float
    argv: list[str] = field(default_factory=list)
    log: Path | None = None
    shows: tuple[Path, ...] = ()

    @property
    def failed(self) -> bool:
        return self.status.startswith(("FAILED", "TIMED OUT"))


def slug(title: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in title).strip("_")


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    """End a command and everything it started (its own session): TERM, then KILL after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_excerpt(log: Path) -> list[str]:
    """The start-up lines and the last lines of a log, without banners and progress bars."""
    if not log.is_file():
        return []
    lines = [line for line in log.read_text(errors="replace").splitlines() if not any(n in line for n in NOISE)]
    startup = [line for line in lines[:-TAIL] if STARTUP_MARK in line]
    return startup + (["..."] if startup else []) + lines[-TAIL:]


class Check:
    """The steps' runner and the report's writer."""

    def __init__(self, out: Path, header: list[str], started: float, start_by: float, end_by: float):
        self.out, self.header, self.started = out, header, started
        self.start_by, self.end_by = start_by, end_by
        self.outcomes: list[Outcome] = []
        self.jobs: dict[str, tuple[Job, subprocess.Popen, float, Path]] = {}
        self.job_outcomes: dict[str, Outcome] = {}
        self.reported_jobs: set[str] = set()  # jobs whose outcome a step reports
        self.report_path = out / "gpu_check.md"

    def minutes(self, at: float) -> str:
        return f"{(at - self.started) / 60:.1f}"

    def start(self, job: Job) -> None:
        log = self.out / f"{slug(job.title)}.log"
        proc = subprocess.Popen(job.argv, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.jobs[job.name] = (job, proc, time.time(), log)

    def settle(self, name: str, until: float) -> Outcome:
        """Wait for a background job until it ends, its timeout or `until`, ending it then; its outcome."""
        if name in self.job_outcomes:
            return self.job_outcomes[name]
        job, proc, began, log = self.jobs[name]
        deadline = min(began + job.timeout, until)
        try:
            rc = proc.wait(max(0.0, deadline - time.time()))
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            stop_group(proc)
            status = "TIMED OUT" if time.time() >= began + job.timeout else "cut: still running when the check ended"
        outcome = Outcome(job.title, status, time.time() - began, job.timeout, job.argv, log)
        self.job_outcomes[name] = outcome
        return outcome

    def run(self, step: Step) -> Outcome:
        """Run one step (or record why it does not run), then rewrite the report."""
        now = time.time()
        if step.skip:
            outcome = Outcome(step.title, f"skipped: {step.skip}", 0, step.timeout)
        elif now >= self.start_by:
            outcome = Outcome(step.title, f"cut: no step starts after minute {self.minutes(self.start_by)}", 0, 0)
        else:
            for name in step.waits_for:
                self.settle(name, self.end_by)
            if step.job:
                self.reported_jobs.add(step.job)
                outcome = replace(self.settle(step.job, self.end_by), title=step.title)
            else:
                outcome = self.execute(step)
        self.outcomes.append(outcome)
        self.write_report()
        return outcome

    def execute(self, step: Step) -> Outcome:
        timeout = max(1.0, min(step.timeout, self.end_by - time.time()))
        log = self.out / f"{slug(step.title)}.log"
        began = time.time()
        with log.open("w") as sink:
            proc = subprocess.Popen(step.argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout)
                status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            except subprocess.TimeoutExpired:
                stop_group(proc)
                status = "TIMED OUT"
        return Outcome(step.title, status, time.time() - began, timeout, step.argv, log, step.shows)

    def finish(self) -> int:
        """End the background jobs still running, write the final report; 1 when a step failed or timed out."""
        for name in self.jobs:
            if name not in self.job_outcomes:
                self.settle(name, time.time())
        self.write_report(final=True)
        return 1 if self.failures() else 0

    def failures(self) -> int:
        """Steps, and background jobs no step reports, that failed or timed out."""
        jobs = [o for name, o in self.job_outcomes.items() if name not in self.reported_jobs]
        return sum(o.failed for o in [*self.outcomes, *jobs])

    def write_report(self, final: bool = False) -> None:
        rows = ["| step | result | seconds | timeout (s) |", "|---|---|---|---|"]
        rows += [f"| {o.title} | {o.status} | {o.seconds:.0f} | {o.timeout:.0f} |" for o in self.outcomes]
        for name, (job, _, began, _) in self.jobs.items():
            done = self.job_outcomes.get(name)
            status, seconds = (done.status, done.seconds) if done else ("running", time.time() - began)
            rows.append(f"| background: {job.title} | {status} | {seconds:.0f} | {job.timeout:.0f} |")
        failed = self.failures()
        cut = sum(o.status.startswith("cut") for o in self.outcomes)
        state = "finished" if final else "in progress"
        summary = f"{state} at minute {self.minutes(time.time())}: {failed} failed, {cut} cut."
        sections = [section for o in self.outcomes if o.log is not None for section in self.section(o)]
        text = "\n".join([*self.header, "", summary, "", *rows, "", *sections]) + "\n"
        partial = self.report_path.with_suffix(".md.tmp")
        partial.write_text(text)
        partial.replace(self.report_path)

    def section(self, o: Outcome) -> list[str]:
        lines = [f"## {o.title}: {o.status} in {o.seconds:.0f} s (timeout {o.timeout:.0f} s)", ""]
        for path in o.shows:
            lines += [path.read_text().rstrip(), ""] if path.is_file() else [f"({path.name} was not written)", ""]
        excerpt = log_excerpt(o.log)
        if o.shows:  # its figures are above: the log's last lines only
            excerpt = excerpt[-3:]
        lines += ["```", f"$ {shlex.join(o.argv)}", *excerpt, "```", ""]
        return lines
