"""The GPU check's runner and plan on this CPU: timeouts, the minute-7 cut, the report after every step, background
jobs, and every command line the plan builds (its dry run end to end: docs/benchmarks.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from tnf_scale.config import parse_args
from tnf_scale.node_check.plan import TWO_GPUS, plan
from tnf_scale.node_check.runner import Check, Job, Step


def shell(script: str) -> list[str]:
    return ["bash", "-c", script]


def check(tmp_path: Path, start_in: float = 60, end_in: float = 90) -> Check:
    now = time.time()
    return Check(tmp_path, ["# test check"], now, now + start_in, now + end_in)


def test_a_step_past_its_timeout_is_ended_with_what_it_started_and_the_next_step_runs(tmp_path):
    """Planted: without the step's timeout the hang eats the call (the test times out)."""
    c = check(tmp_path)
    began = time.time()
    hung = c.run(Step("hangs", shell(f"sleep 60 & echo $! > {tmp_path}/child; wait"), timeout=1))
    after = c.run(Step("after", shell("echo fine"), timeout=10))
    assert hung.status == "TIMED OUT" and time.time() - began < 20 and after.status == "ok"
    child = int((tmp_path / "child").read_text())
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text().lower()
    assert c.finish() == 1
    report = (tmp_path / "gpu_check.md").read_text()
    assert hung.timeout == 1 and "| hangs | TIMED OUT |" in report and "| after | ok |" in report


def test_no_step_starts_after_the_start_deadline_and_the_report_says_what_was_cut(tmp_path):
    """Planted: without the deadline the second step runs."""
    c = check(tmp_path, start_in=0.3)
    c.run(Step("first", shell("sleep 0.5"), timeout=10))
    cut = c.run(Step("second", shell(f"touch {tmp_path}/ran"), timeout=10))
    assert cut.status.startswith("cut: no step starts after minute") and not (tmp_path / "ran").exists()
    assert c.finish() == 0  # a cut is not a failure of the node
    assert "| second | cut: no step starts after minute 0.0 | 0 | 0 |" in (tmp_path / "gpu_check.md").read_text()


def test_the_report_is_written_after_every_step_with_its_figures(tmp_path):
    """A call cut off from outside still leaves what it measured (planted: a report written only at the end fails)."""
    c = check(tmp_path)
    figures = tmp_path / "figures.md"
    c.run(Step("measures", shell(f"echo '- 42 tokens/s' > {figures}; echo done"), shows=(figures,)))
    second = c.run(Step("reads the report", ["cat", str(tmp_path / "gpu_check.md")]))
    seen = second.log.read_text()
    assert "| measures | ok |" in seen and "- 42 tokens/s" in seen and "in progress" in seen
    c.run(Step("two GPUs only", ["false"], skip=TWO_GPUS))
    c.finish()
    report = (tmp_path / "gpu_check.md").read_text()
    assert f"| two GPUs only | skipped: {TWO_GPUS} | 0 |" in report and report.count("finished at minute") == 1


def test_a_background_job_is_waited_for_and_its_outcome_reported_once(tmp_path):
    """A failed build is reported by the step that reports it, with its error, and counted once."""
    c = check(tmp_path)
    c.start(Job("build", "Build", shell("sleep 0.2; echo 'nvcc fatal: unsupported'; exit 3"), timeout=30))
    c.start(Job("slow", "Slow", ["sleep", "60"], timeout=0.05))  # lapsed by the end of the 0.2 s build
    c.start(Job("long", "Long", shell(f"sleep 60 & echo $! > {tmp_path}/long; wait"), timeout=600))
    waited = c.run(Step("needs the build", shell(f"test -f {tmp_path}/Build.log && echo after"), waits_for=("build",)))
    reported = c.run(Step("The build", job="build"))
    assert waited.status == "ok" and reported.status == "FAILED (exit 3)" and reported.title == "The build"
    assert c.finish() == 1 and c.failures() == 2  # the build once, and the slow job that outlived its timeout
    report = (tmp_path / "gpu_check.md").read_text()
    assert "nvcc fatal: unsupported" in report and "| background: Slow | TIMED OUT |" in report
    assert "| background: Long | cut: still running when the check ended |" in report  # ended, not left behind
    long = int((tmp_path / "long").read_text())
    assert not Path(f"/proc/{long}").exists() or "zombie" in Path(f"/proc/{long}/status").read_text().lower()


def train_flags(argv: list[str]) -> list[str]:
    return argv[argv.index("tnf_scale/train.py") + 1 :] if "tnf_scale/train.py" in argv else []


@pytest.mark.parametrize(("dry", "gpus"), [(True, 0), (False, 1), (False, 8)])
def test_every_training_command_of_the_plan_is_one_train_py_accepts(dry, gpus, tmp_path, monkeypatch):
    """The real check's commands cannot run here, so each is parsed by train.py's own flags (planted: a misspelt flag
    in the plan fails); one GPU skips the 2-rank steps and says why."""
    monkeypatch.chdir(REPO)
    jobs, steps = plan(tmp_path, dry, gpus, sys.executable, Path(sys.executable).parent, 29800)
    parsed = 0
    for step in steps:
        flags = train_flags(step.argv) or (step.argv[4:] if "sync_census" in " ".join(step.argv) else [])
        if flags:
            parse_args(flags)
            parsed += 1
    assert parsed == 12  # eleven training runs and the census
    skipped = [s.title for s in steps if s.skip]
    assert (len(skipped) == 4) == (gpus == 1) and all(s.skip in ("", TWO_GPUS) for s in steps)
    large = next(s for s in steps if "TNF on (with the export)" in s.title)
    assert parse_args(train_flags(large.argv)).log_interval == (2 if dry else 10)  # never 1: its collective biases TNF
    compiled = next(s for s in steps if "encoder layers compiled" in s.title)  # the A/B of --compile
    assert parse_args(train_flags(compiled.argv)).compile and not parse_args(train_flags(large.argv)).compile
    assert {j.name for j in jobs} == {"build", "data"}


def test_a_sync_is_charged_to_its_innermost_owned_caller_not_to_the_census(monkeypatch):
    """Planted: counting the census's own frames charges every sync to sync_census.py."""
    import warnings
    from collections import Counter

    import tnf_scale
    from tnf_scale.node_check import sync_census

    owners = {"tnf_scale": str(Path(tnf_scale.__file__).parent), "tests": str(Path(__file__).parent)}
    monkeypatch.setattr(sync_census, "OWNERS", owners)
    counts: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = sync_census.counting(counts)
        for _ in range(4):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    assert counts == {"tests": 4}
    assert "1 steps counted; 4 host syncs per step." in sync_census.census_table(counts, 1)


def test_an_out_that_is_a_file_is_one_sentence_before_any_step(tmp_path, capsys):
    """`--out` naming a file gave 16 "Not a directory" errors, then a report path inside the file."""
    from tnf_scale.node_check.__main__ import main

    file = tmp_path / "report"
    file.write_text("kept")
    assert main(["--dry_run", "--out", str(file / "check")]) == 2
    err = capsys.readouterr().err
    assert f"--out {file / 'check'}: {file} is a file; name a directory." in err and err.count("\n") == 1
    assert file.read_text() == "kept"
