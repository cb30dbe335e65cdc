"""Faults a cluster user meets: the run-directory lock, checkpoint manifests, a full or read-only disk, a busy master
port, a diverging run, and (under the real launcher) killed ranks, stop signals and a dead launcher."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COMPARED_RUN, REPO, check_ok, clean_env, free_port, run_cmd, train_args
from safetensors.torch import save_file

from tnf_scale.checkpoint import (
    COMPLETE,
    CheckpointError,
    complete_checkpoints,
    plan_resume,
    rank_file,
    write_manifest,
)
from tnf_scale.errors import ConfigError
from tnf_scale.launch import TRAIN_SCRIPT, deepspeed_command
from tnf_scale.metrics import read_metrics
from tnf_scale.nonfinite import Diverged, NonfiniteGuard
from tnf_scale.run_lock import RunLock


def lock_from_another_process(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    code = (
        "import sys; from pathlib import Path; from tnf_scale.errors import exit_code; from tnf_scale.run_lock "
        "import RunLock; "
        f"sys.exit(exit_code(lambda: RunLock(Path({str(path)!r})).acquire(print) or 0))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env={**clean_env(), **(env or {})}, capture_output=True, text=True
    )


def test_a_live_holder_keeps_the_lock_and_a_dead_one_loses_it(tmp_path):
    path = tmp_path / "run" / "LOCK"
    lock = RunLock(path)
    lock.acquire()
    holder = json.loads(path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    refused = lock_from_another_process(path)
    assert (
        refused.returncode == 2
        and f"is in use by another run (PID {os.getpid()} on {socket.gethostname()}" in refused.stderr
    )
    assert json.loads(path.read_text())["pid"] == os.getpid()  # the refusal left the holder's lock alone
    lock.release()
    assert not path.exists() and not path.parent.exists()  # the directory it created, left empty, is gone too

    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID is free now
    path.parent.mkdir()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))
    assert lock_from_another_process(path).returncode == 0  # stale: taken over (and released on exit)
    assert not path.exists()


def test_a_lock_from_another_host_is_refused_unless_it_is_this_slurm_jobs_earlier_run(tmp_path):
    path = tmp_path / "LOCK"
    path.write_text(
        json.dumps({"host": "node-17", "pid": 4242, "slurm_job": "77", "started": "yesterday", "command": "train.py"})
    )
    refused = lock_from_another_process(path)
    assert (
        refused.returncode == 2
        and "PID 4242 on node-17, SLURM job 77" in refused.stderr
        and f"delete {path}" in refused.stderr
    )
    assert (
        lock_from_another_process(path, {"SLURM_JOB_ID": "77"}).returncode == 0
    )  # the requeued job takes its own lock back


def fake_squeue(folder: Path, state: str | None) -> dict[str, str]:
    """A PATH whose `squeue` answers like SLURM's: the job's state, or (None) the error of a job SLURM has purged."""
    folder.mkdir(exist_ok=True)
    answer = f"echo {state}" if state else "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1"
    (folder / "squeue").write_text(f"#!/bin/sh\n{answer}\n")
    (folder / "squeue").chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


def test_a_lock_from_another_host_is_taken_over_once_slurm_says_its_job_ended_or_its_lease_lapsed(tmp_path):
    """A resubmitted job (another job id, maybe another node) meets the LOCK of a job that was killed: taken over, with
    a line naming why, once SLURM says that job no longer runs, or once its lease went unrenewed; a running job's
    lock and a fresh lease are kept. Planted: without the SLURM check the COMPLETED case is refused; without the lease
    the lapsed case is refused."""
    path = tmp_path / "LOCK"
    holder = {"host": "node-17", "pid": 4242, "slurm_job": "77", "lease_seconds": 900, "command": "train.py"}
    for state, taken in (
        ("RUNNING", False),
        ("COMPLETING", False),
        ("COMPLETED", True),
        ("CANCELLED", True),
        (None, True),
    ):
        path.write_text(json.dumps(holder))
        result = lock_from_another_process(path, fake_squeue(tmp_path / "bin", state))
        assert (result.returncode == 0) == taken, (state, result.stderr)
        if taken:
            assert f"took over {path} from PID 4242 on node-17, SLURM job 77" in result.stdout
            assert ("is " + state if state else "no longer exists") in result.stdout
    unknown = {k: v for k, v in holder.items() if k != "slurm_job"}
    path.write_text(json.dumps(unknown))
    assert lock_from_another_process(path).returncode == 2  # renewed a moment ago: a live run elsewhere
    lapsed = time.time() - 1000
    os.utime(path, (lapsed, lapsed))
    result = lock_from_another_process(path)
    assert result.returncode == 0 and "last renewed it 17 minutes ago (the lease is 15)" in result.stdout
    path.write_text(json.dumps({k: v for k, v in unknown.items() if k != "lease_seconds"}))
    os.utime(path, (lapsed, lapsed))
    assert lock_from_another_process(path).returncode == 2  # a lock that keeps no lease cannot be judged by its age


def test_the_holder_renews_its_lease_while_it_holds_the_lock(tmp_path, monkeypatch):
    """Planted: no renewal leaves the lock's time where it was set."""
    from tnf_scale import run_lock

    monkeypatch.setattr(run_lock, "RENEW_SECONDS", 0.05)
    lock = RunLock(tmp_path / "run" / "LOCK")
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.monotonic() + 10
    while lock.path.stat().st_mtime < old + 900 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.path.stat().st_mtime > time.time() - 60
    lock.release()
    assert not lock.path.exists()


def test_a_locked_output_dir_refuses_a_second_run_before_anything_is_written(small_config, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out / "LOCK")
    lock.acquire()
    proc = run_cmd([sys.executable, "-m", "tnf_scale.train", *train_args(small_config, out, max_steps=2)])
    lock.release()
    assert proc.returncode == 2 and "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.fixture
def tmpfs(tmp_path):
    """A mount point for a small tmpfs (this machine's tests run as root; elsewhere they are skipped)."""
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(point)], capture_output=True
        ).returncode:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)])


def test_a_read_only_output_dir_is_one_sentence(tmpfs):
    read_only = tmpfs("1m", ",ro")
    for target, message in (
        (read_only, "cannot write into --output_dir"),
        (read_only / "run", "cannot create --output_dir"),
    ):
        with pytest.raises(ConfigError, match=message):
            RunLock(target / "LOCK").acquire()


def test_a_full_disk_during_a_checkpoint_is_named_and_nothing_is_marked_complete(small_config, tmpfs):
    out = tmpfs("3m") / "run"
    proc = run_cmd(
        [sys.executable, "-m", "tnf_scale.train", *train_args(small_config, out, max_steps=2, export="false")]
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no space left on device" in proc.stderr and "no complete checkpoint exists yet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.glob(f"checkpoints/*/{COMPLETE}")) and not (out / "LOCK").exists()


def test_a_busy_master_port_with_one_rank_is_named(small_config, tmp_path):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {
            **clean_env(),
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "tnf_scale.train", *train_args(small_config, tmp_path / "run", max_steps=2)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert (
        proc.returncode == 2
        and f"master port {port} is already in use" in proc.stderr
        and "Traceback" not in proc.stderr
    )


def fake_checkpoint(run: Path, step: int) -> Path:
    ckpt = run / "checkpoints" / f"step{step:08d}"
    ckpt.mkdir(parents=True)
    save_file(
        {"ids": torch.arange(4), "vectors": torch.randn(4, 8), "torch_rng_state": torch.get_rng_state()},
        str(rank_file(ckpt, 0)),
    )
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(4096))
    write_manifest(ckpt, rank=0, world_size=1)
    (ckpt / COMPLETE).write_text(
        json.dumps(
            {"step": step, "world_size": 1, "notes": True, "rare_vocab_digest": "d", "tokens": 0, "wall_time": 0.0}
        )
    )
    return ckpt


def save_in_a_worker(run: Path, step: int, keep: int, mode: str, protected: Path | None = None):
    args = [sys.executable, "tests/workers/prune_worker.py", str(run), str(step), str(keep), mode]
    return run_cmd([*args, *([str(protected)] if protected else [])], timeout=300)


def test_retention_deletes_only_once_a_newer_checkpoint_is_complete_and_keeps_the_one_resumed_from(tmp_path):
    """--keep_checkpoints through the real Checkpointer: a save killed halfway (SIGKILL after DeepSpeed's files)
    deletes nothing and marks nothing complete; a save that completes deletes the complete checkpoints beyond the
    newest K with their universal forms, but never the one the run resumed from. Planted: pruning before the save
    (the killed save then leaves 2 of 3) and pruning the protected one each fail."""
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "universal" / "step00000004").mkdir(parents=True)
    killed = save_in_a_worker(tmp_path, 8, keep=2, mode="kill")
    assert killed.returncode == -9, killed.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*"))
    assert names == ["step00000002", "step00000004", "step00000006", "step00000008"]
    assert not (tmp_path / "checkpoints" / "step00000008" / COMPLETE).exists()

    oldest = tmp_path / "checkpoints" / "step00000002"
    done = save_in_a_worker(tmp_path, 8, keep=2, mode="finish", protected=oldest)
    check_ok(done)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000002", "step00000006", "step00000008"]
    assert not (tmp_path / "checkpoints" / "step00000004").exists()
    assert not (tmp_path / "checkpoints" / "universal" / "step00000004").exists()


def test_a_step_that_is_not_saved_does_not_look_at_the_file_system(tmp_path, monkeypatch):
    """Every step asks the checkpointer; only a step the interval saves may list the checkpoints (a glob and a stat
    of each, on a shared file system, at every step). Planted: the listing before the interval check fails."""
    from types import SimpleNamespace

    from tnf_scale import checkpoint
    from tnf_scale.run_dir import RunDir

    (tmp_path / "rare_vocab.tsv").write_text("word\t3\n")
    saver = checkpoint.Checkpointer(RunDir(tmp_path), SimpleNamespace(rank=0, size=1), tmp_path / "rare_vocab.tsv",
                                    None, save_interval=10)  # fmt: skip

    def listed(_):
        raise AssertionError("the checkpoints were listed")

    monkeypatch.setattr(checkpoint, "latest_complete", listed)
    assert [saver.save(step) for step in range(1, 10)] == [None] * 9


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:1000]), "has 1000 bytes, not 4096 \\(truncated or overwritten\\)"),
        (lambda f: f.write_bytes(bytes(4096)), "differs from its checksum"),
        (lambda f: f.unlink(), "is missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_by_file_and_the_previous_one_offered(tmp_path, damage, message):
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6)
    assert plan_resume(tmp_path, "d", num_rare=4).step == 6
    damage(newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(
        CheckpointError,
        match=f"zero_pp_rank_0_mp_rank_00_optim_states.pt {message}.*previous complete checkpoint is step00000003",
    ):
        plan_resume(tmp_path, "d", num_rare=4)


def test_doing_what_the_damaged_checkpoint_message_says_resumes_from_the_previous_one(tmp_path):
    """`mv stepN stepN.damaged` used to be refused again: the moved folder still matched `step*`."""
    fake_checkpoint(tmp_path, 3)
    newest = fake_checkpoint(tmp_path, 6)
    newest.rename(newest.with_name(f"{newest.name}.damaged"))
    assert plan_resume(tmp_path, "d", num_rare=4).step == 3


def test_a_checkpoint_without_its_manifest_is_damaged_not_a_different_vocabulary(tmp_path):
    """A folder holding only COMPLETE used to be called "a different rare vocabulary"; without MANIFEST.json nothing
    was checked, and a truncated file then failed deep inside DeepSpeed."""
    fake_checkpoint(tmp_path, 3)
    bare = tmp_path / "checkpoints" / "step00000006"
    bare.mkdir()
    (bare / COMPLETE).write_text(json.dumps({"step": 6, "world_size": 1, "notes": True}))
    with pytest.raises(CheckpointError, match="MANIFEST.json is missing.*previous complete checkpoint is step00000003"):
        plan_resume(tmp_path, "d", num_rare=4)


def test_a_pipeline_checkpoint_resumed_with_another_number_of_stages_is_refused_and_other_replicas_are_not(
    tmp_path, monkeypatch
):
    """A stage's layer files hold its own layers, so the stages must match; the replicas may change (DeepSpeed's
    universal form then loads each stage's optimizer state)."""
    from types import SimpleNamespace

    from tnf_scale import checkpoint
    from tnf_scale.checkpoint import Checkpointer, CheckpointMarker, ResumePoint
    from tnf_scale.distributed import ParallelDims
    from tnf_scale.run_dir import RunDir

    monkeypatch.setattr(checkpoint, "wait_for_all", lambda topo: None)  # no process group here
    (tmp_path / "rare_vocab.tsv").write_text("word\t3\n")
    ckpt = fake_checkpoint(tmp_path, 6)
    marker = CheckpointMarker(step=6, world_size=4, notes=True, pipeline_stages=2, zero_stage=1)
    for dims, refused in ((ParallelDims(1, 2), True), (ParallelDims(4, 1), True), (ParallelDims(2, 1), False)):
        topo = SimpleNamespace(rank=0, size=dims.pipeline * dims.data, dims=dims, is_main=True, control=None)
        checkpointer = Checkpointer(RunDir(tmp_path), topo, tmp_path / "rare_vocab.tsv", 4)
        checkpointer.point = ResumePoint(ckpt, marker, {})
        if refused:
            with pytest.raises(
                ConfigError, match=rf"saved with 2 pipeline stage\(s\) and this run has {dims.pipeline}"
            ):
                checkpointer.adapt({"zero_optimization": {"stage": 1}})
        else:
            checkpointer.source = ckpt
            (tmp_path / "checkpoints" / "universal" / ckpt.name).mkdir(parents=True)
            (tmp_path / "checkpoints" / "universal" / ckpt.name / COMPLETE).write_text("{}")  # converted already
            config = {"zero_optimization": {"stage": 1}}
            checkpointer.adapt(config)
            assert config["checkpoint"] == {"load_universal": True} and checkpointer.source.parent.name == "universal"


def test_a_resume_checks_the_flags_the_checkpoint_records_when_run_config_json_is_gone(tmp_path):
    """A resume with another --hidden_size in a run without run_config.json used to end in DeepSpeed's size-mismatch
    traceback; the checkpoint now records the flags that shape it, and a checkpoint recording none (written before
    it did) is refused in one sentence when run_config.json is gone."""
    from types import SimpleNamespace

    from tnf_scale.checkpoint import Checkpointer
    from tnf_scale.config import RunConfig
    from tnf_scale.run_dir import RunDir

    ckpt = fake_checkpoint(tmp_path, 6)
    (tmp_path / "rare_vocab.tsv").write_text("word\t3\n")
    checkpointer = Checkpointer(RunDir(tmp_path), SimpleNamespace(rank=0, size=1), tmp_path / "rare_vocab.tsv", 4)
    checkpointer.rare_vocab_digest = "d"
    with pytest.raises(
        CheckpointError, match="does not record the flags it was trained with and .*run_config.json is missing"
    ):
        checkpointer.plan(RunConfig(resume=True, max_steps=9))
    marker = json.loads((ckpt / COMPLETE).read_text())
    trained = RunConfig(hidden_size=128)
    marker["trained_with"] = {"hidden_size": trained.hidden_size, "seed": trained.seed}
    (ckpt / COMPLETE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="trained with --hidden_size 128, not 256"):
        checkpointer.plan(RunConfig(resume=True, max_steps=9, hidden_size=256))
    checkpointer.plan(RunConfig(resume=True, max_steps=9, hidden_size=128))
    assert checkpointer.point.step == 6


def test_the_guard_stops_after_consecutive_non_finite_steps_only():
    guard = NonfiniteGuard(limit=2)
    guard.observe(float("nan"), 1.0)
    guard.stop_if_diverged(1, last_good_checkpoint=None)
    assert not guard.healthy
    guard.observe(3.0, 1.0)  # finite again: the streak ends
    assert guard.healthy and guard.total == 1
    guard.observe(3.0, float("inf"))
    guard.stop_if_diverged(3, last_good_checkpoint=2)
    guard.observe(float("nan"), None)
    with pytest.raises(Diverged, match="step 4: .*not finite for 2 consecutive steps.*last good checkpoint is step 2"):
        guard.stop_if_diverged(4, last_good_checkpoint=2)


@pytest.fixture
def stop_handlers():
    """StopRequest installs process-wide signal handlers: pytest's are put back afterwards."""
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_dead_launcher_stops_the_ranks_like_sigterm(monkeypatch, stop_handlers):
    """The launcher watch in-process (the KILL@launcher trial below runs it end to end): a watched launcher that dies,
    even by SIGKILL, is named and the ranks stop at the next boundary with exit 86."""
    import psutil

    from tnf_scale import stopping

    monkeypatch.setattr(stopping, "all_reduce_sum", lambda values, device: list(values))  # a world of one
    launcher = subprocess.Popen(["sleep", "60"])
    request = stopping.StopRequest(launchers=[psutil.Process(launcher.pid)])
    assert request.reason is None and not request.agreed(torch.device("cpu"))
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 4 * stopping.LAUNCHER_POLL_SECONDS
    while request.reason is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert request.reason == f"its launcher (sleep, PID {launcher.pid}) exited"
    assert request.agreed(torch.device("cpu")) and request.exit_code == stopping.STOPPED_EXIT


def test_a_usr1_handled_as_the_step_boundary_collective_returns_still_requeues(monkeypatch, stop_handlers):
    """Python runs a signal handler only when the blocking all-reduce returns: after this rank's share was sent. The
    flag the handler set must survive that sum, so the next boundary stops with 85 (requeue), not 86 (a CI failure)."""
    import signal

    from tnf_scale import stopping

    request = stopping.StopRequest(launchers=[])

    def sum_then_signal(values, device):
        request._handle(signal.SIGUSR1, None)  # the signal arrived while the collective blocked
        return [0.0] * len(values)  # what every rank sent before it

    monkeypatch.setattr(stopping, "all_reduce_sum", sum_then_signal)
    assert not request.agreed(torch.device("cpu"))
    monkeypatch.setattr(stopping, "all_reduce_sum", lambda values, device: list(values))
    assert request.agreed(torch.device("cpu")) and request.exit_code == stopping.PREEMPTED_EXIT


def test_a_diverging_run_stops_in_one_sentence_and_exports_nothing(small_config, tmp_path):
    out = tmp_path / "run"
    args = train_args(small_config, out, max_steps=12, lr=1e30, warmup_steps=1, save_interval=1, max_nonfinite_steps=2)
    proc = run_cmd([sys.executable, "-m", "tnf_scale.train", *args])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "not finite for 2 consecutive steps" in proc.stderr and "Traceback" not in proc.stderr
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert steps[-1]["nonfinite_steps"] == 2 and steps[-1]["step"] < 12
    saved = sorted(int(p.parent.name[4:]) for p in out.glob(f"checkpoints/*/{COMPLETE}"))
    assert saved and saved[-1] < steps[-1]["step"] - 1  # nothing saved once the loss stopped being finite
    assert not (out / "export").exists() and not (out / "notes.safetensors").exists()


@pytest.mark.launcher
def test_a_rank_that_fails_on_its_own_is_named_first_while_the_others_are_silent_in_a_collective(tmp_path):
    """Rank 0 fails in its own code (the export's conversion, say) while ranks 1..3 wait in a collective that has not
    noticed: they have no record yet but are alive, and rank 0 is named, not "ranks 1, 2, 3 died first". A rank that
    lost its peers, with another rank silent, still names the silent one. Planted: ignoring whether an error lost a
    peer names ranks 1, 2, 3."""
    from tnf_scale.checkpoint import ConversionFailed
    from tnf_scale.failures import first_failure, read_failures, record_failure
    from tnf_scale.run_dir import RunDir

    run = RunDir(tmp_path)
    record_failure(run, 0, ConversionFailed("DeepSpeed's universal conversion of step12 failed: RuntimeError: shape"))
    assert first_failure(read_failures(run), 4) == (
        [0],
        f"rank 0 on {socket.gethostname()} failed first (ConversionFailed: DeepSpeed's universal conversion of "
        "step12 failed: RuntimeError: shape)",
    )
    lost = RunDir(tmp_path / "lost")
    record_failure(lost, 0, torch.distributed.DistBackendError("[gloo/pair.cc:534] Connection closed by peer"))
    record_failure(lost, 2, RuntimeError("[gloo/pair.cc:534] Connection closed by peer [127.0.0.1]:4242"))
    assert first_failure(read_failures(lost), 3)[0] == [1]


def test_fault_campaign_a_killed_rank_or_runner_loses_nothing_and_the_resume_is_identical(
    small_config, dp_reference_run, tmp_path
):
    """Two trials of tools/fault_campaign.py against the shared 1-rank reference (the same training on 2 ranks agrees
    within 1e-5): SIGKILL to a rank, whose survivor names it and the resume step; SIGKILL to the real `deepspeed`
    runner, after which every rank says it stopped at the checkpointed step with exit 86. Both resumed runs match."""
    out = tmp_path / "faults"
    flags = [
        a for a in train_args(small_config, out, max_steps=20, deepspeed_config="ds_configs/zero1.json", **COMPARED_RUN)
    ]
    flags = [
        x
        for key, value in zip(flags[::2], flags[1::2])
        if key not in ("--output_dir", "--max_steps")
        for x in (key, value)
    ]
    proc = run_cmd(
        [
            sys.executable,
            "tools/fault_campaign.py",
            "--trials",
            "2",
            "--in_order",
            "--faults",
            "KILL@rank,KILL@launcher",
            "--max_steps",
            "20",
            "--save_interval",
            "3",
            "--reference",
            str(dp_reference_run),
            "--master_port",
            str(free_port()),
            "--out",
            str(out),
            *flags,
        ],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2/2 identical within 1e-05, 0 notes lost, 0 orphaned ranks" in proc.stdout
    killed_rank, killed_runner = json.loads((out / "fault_campaign.json").read_text())
    victim = killed_rank["target"].split()[-1]
    assert (
        f"rank {victim} died first without a word" in killed_rank["last_words"]
        and "it continues from step" in killed_rank["last_words"]
    )
    assert killed_runner["target"].startswith("launcher PID") and killed_runner["stopped_together"] is True
    step = killed_runner["resumed_from"]
    assert sorted(killed_runner["stops"]) == [[0, step, 86], [1, step, 86]]
    # rank 0 names the launcher when it saw the death itself, else "another rank ... lost its launcher"
    assert "launcher" in killed_runner["last_words"] and f"checkpointed step {step}" in killed_runner["last_words"]


def test_bad_data_input_on_two_ranks_is_one_sentence_and_no_traceback(small_config, tmp_path):
    """Local rank 0 prepares; when the corpus is bad, it says so and the other rank stops with it (no traceback)."""
    out = tmp_path / "run"
    args = train_args(small_config, out, corpus=str(tmp_path / "missing.jsonl"), max_steps=2)
    proc = run_cmd(deepspeed_command(2, free_port(), TRAIN_SCRIPT, args))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("missing.jsonl does not exist") == 1 and "Traceback" not in proc.stderr, proc.stderr[
        -3000:
    ]
    assert not out.exists()


@pytest.mark.parametrize("ending", ["done", "refused", "failed"])
def test_the_process_group_is_destroyed_on_every_way_out_of_a_command(ending):
    """A command that started a process group leaves none behind, however it ends (see end_process_groups)."""
    body = {
        "done": "return 0",
        "refused": "raise ConfigError('no')",
        "failed": "raise RuntimeError('boom')",
    }[ending]
    code = (
        "import atexit, sys, torch\n"
        "from tnf_scale.distributed import discover, init_distributed\n"
        "from tnf_scale.errors import ConfigError\n"
        "from tnf_scale.startup import command\n"
        "atexit.register(lambda: print('left initialized:', torch.distributed.is_initialized()))\n"
        "def run(cfg):\n"
        "    init_distributed(discover())\n"
        f"    {body}\n"
        "sys.exit(command(run, []))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert proc.returncode == {"done": 0, "refused": 2, "failed": 1}[ending], proc.stderr[-2000:]
    assert "left initialized: False" in proc.stdout


def test_long_waits_run_on_a_gloo_control_group_and_nccl_errors_raise_in_python():
    """Waiting for one rank's long work (data preparation, a checkpoint conversion, the export) must not meet NCCL's
    10-minute watchdog: those waits run on a gloo group with a timeout of hours. And a failed NCCL collective aborts
    its communicator and raises in Python (TORCH_NCCL_ASYNC_ERROR_HANDLING=2), so the last-words code runs."""
    code = (
        "import os, torch\n"
        "from tnf_scale.distributed import CONTROL_TIMEOUT, any_rank_on_control, discover, init_distributed, "
        "wait_for_all\n"
        "topo = init_distributed(discover())\n"
        "wait_for_all(topo)\n"
        "print(torch.distributed.get_backend(topo.control), CONTROL_TIMEOUT.total_seconds() >= 3600,\n"
        "      os.environ['TORCH_NCCL_ASYNC_ERROR_HANDLING'], any_rank_on_control(True, topo))\n"
        "torch.distributed.destroy_process_group()\n"
    )
    env = {k: v for k, v in clean_env().items() if k != "TORCH_NCCL_ASYNC_ERROR_HANDLING"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gloo True 2 True" in proc.stdout
