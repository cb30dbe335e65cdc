"""The three ways users launch, each for real on this host: deepspeed --hostfile over pdsh/ssh,
sbatch on a local SLURM (with pre-emption and requeue), and mpirun; plus the pre-flight checks."""

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
from cluster import job_state, local_slurm, loopback_sshd, require, wait_for_job
from conftest import DEEPSPEED, ELECTRA_RUN, ELECTRA_ZERO, REPO, check_ok, clean_env, free_port, train_args
from safetensors.torch import load_file

from tnf_scale.cli.preflight import main as preflight_main
from tnf_scale.metrics import read_metrics

pytestmark = pytest.mark.cluster


def notes_of(run: Path) -> torch.Tensor:
    return load_file(str(run / "notes.safetensors"))["vectors"]


# The launchers train ELECTRA with notes (BERT's runs cover the other paths): each run must reproduce the notes of the
# same training on one host under the deepspeed launcher (conftest.electra_run).


def test_hostfile_launch_over_pdsh_on_two_loopback_nodes(small_config, electra_run, tmp_path):
    with loopback_sshd(tmp_path / "sshd") as (ssh_port, ssh_args):
        hostfile = tmp_path / "hosts"
        hostfile.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
        ds_env = tmp_path / "deepspeed_env"
        ds_env.write_text(
            f"DS_ACCELERATOR=cpu\nTORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}\nPYTHONPATH={REPO}\n"
        )
        env = {**clean_env(), "PDSH_SSH_ARGS_APPEND": ssh_args, "DS_ENV_FILE": str(ds_env)}
        out = tmp_path / "run"
        proc = subprocess.run(
            [
                DEEPSPEED,
                "--hostfile",
                str(hostfile),
                "--no_ssh_check",
                "--ssh_port",
                str(ssh_port),
                "--master_addr",
                "127.0.0.2",
                "--master_port",
                str(free_port()),
                "tnf_scale/train.py",
                *train_args(small_config, out, deepspeed_config=ELECTRA_ZERO, **ELECTRA_RUN),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    check_ok(proc)
    # pdsh prefixes each node's lines with its host: rank 0 ran on the first node, rank 1 on the second
    assert (
        "127.0.0.2: rank 0/2" in proc.stdout
        and "127.0.0.3: rank 1/2" in proc.stdout
        and "master 127.0.0.2" in proc.stdout
    )
    assert "node_rank=0" in proc.stdout and "node_rank=1" in proc.stdout
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == list(range(1, ELECTRA_RUN["max_steps"] + 1))
    assert torch.equal(notes_of(out), notes_of(electra_run))


def test_mpirun_trains_tnf_through_mpi4py_discovery(small_config, electra_run, tmp_path):
    require("mpirun")
    pytest.importorskip("mpi4py")
    out = tmp_path / "run"
    env = {
        **clean_env(),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    args = [
        "mpirun",
        "-np",
        "2",
        *(
            a
            for v in ("MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PYTHONPATH")
            for a in ("-x", v)
        ),
        sys.executable,
        "tnf_scale/train.py",
        *train_args(small_config, out, deepspeed_config=ELECTRA_ZERO, **ELECTRA_RUN),
    ]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    # Guards the teardown: without it, gloo's threads outlived the process group at interpreter exit and a run
    # that had trained, checkpointed and exported ended in SIGABRT (exit 134) now and then.
    assert "terminate called" not in proc.stderr
    check_ok(proc)
    assert "rank 0/2 local 0" in proc.stdout and "rank 1/2 local 1" in proc.stdout and "(from mpi)" in proc.stdout
    assert proc.stdout.count("(from mpi); 1 intra-op thread (--intra_op_threads)") == 2
    assert torch.equal(notes_of(out), notes_of(electra_run))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with local_slurm(tmp_path_factory.mktemp("slurm")) as env:
        yield env


def sbatch(slurm_env: dict, small_config, run_root: Path, run_dir: Path) -> str:
    """Submit slurm/pretrain_large.sh training the conftest ELECTRA run (ELECTRA_RUN) on 2 tasks into `run_dir`;
    returns the job id."""
    run_root.mkdir(parents=True, exist_ok=True)  # SLURM writes the job log there
    flags = train_args(small_config, run_root / "unused", **ELECTRA_RUN)
    flags = [
        f
        for i, f in enumerate(flags)
        if f not in ("--corpus", "--output_dir") and flags[i - 1] not in ("--corpus", "--output_dir")
    ]
    env = {
        **clean_env(),
        **{k: v for k, v in slurm_env.items() if k == "SLURM_CONF"},
        "PYTHON": sys.executable,
        "CORPUS": small_config.corpus[0],
        "PRESET": "tiny",
        "DS_CONFIG": ELECTRA_ZERO,
        "RUN_DIR": str(run_dir),
        "TRAIN_ARGS": " ".join(flags),
    }
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            f"--output={run_root}/%x-%j.out",
            "--time=00:20:00",
            "slurm/pretrain_large.sh",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    check_ok(proc)
    return proc.stdout.strip().split(";")[0]


def test_usr1_checkpoints_and_requeues_and_a_resubmission_resumes_without_losing_a_note(
    slurm, small_config, electra_run, tmp_path
):
    """The batch script runs an ELECTRA job into a named run directory, sent SIGUSR1 (SLURM's warning before
    preemption) once it passed step 4: it checkpoints and requeues itself. That job is then cancelled while it waits,
    and a LOCK is planted as a job killed on another node leaves it; the same command submitted again (a new job id)
    takes the lock over because SLURM says the old job ended, resumes by --resume auto, and completes with the notes
    of the same training under the deepspeed launcher (conftest.electra_run), logging plain lines."""
    logs, run = tmp_path / "logs", tmp_path / "named_run"
    job = sbatch(slurm, small_config, logs, run)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or max((r["step"] for r in read_metrics(run)), default=0) < 4:
        assert time.monotonic() < deadline, job_state(job, slurm)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    while job_state(job, slurm).get("JobState") not in ("PENDING", "COMPLETED", "FAILED"):
        assert time.monotonic() < deadline, job_state(job, slurm)
        time.sleep(0.5)
    first_log = (logs / f"tnf-bert-large-{job}.out").read_text()
    state = job_state(job, slurm)
    assert state["JobState"] == "PENDING" and int(state.get("Restarts", 0)) == 1, first_log[-4000:]  # requeued
    subprocess.run(["scancel", job], env=slurm, check=True)
    assert "SIGUSR1: checkpointed step" in first_log and "rank 1/2" in first_log and "(from slurm)" in first_log
    stopped_at = int(first_log.split("SIGUSR1: checkpointed step ")[1].split()[0])
    assert 4 <= stopped_at < 12
    wait_for_job(job, slurm)
    (run / "LOCK").write_text(json.dumps({"host": "node-17", "pid": 4242, "slurm_job": job, "lease_seconds": 900}))

    again = sbatch(slurm, small_config, logs, run)
    state = wait_for_job(again, slurm)
    log = (logs / f"tnf-bert-large-{again}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", log[-4000:]
    assert f"took over {run / 'LOCK'} from PID 4242 on node-17, SLURM job {job}: SLURM says job {job} is CANCELLED" in (
        log
    )
    assert f"at step {stopped_at}" in log.split("resumed from")[1].splitlines()[0]
    assert "\nstep 12/12 | loss " in log and "\r" not in log  # plain progress lines in the .out file, no bar
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 13))
    assert (run / "checkpoints" / "step00000012" / "COMPLETE").is_file()
    assert torch.equal(notes_of(run), notes_of(electra_run))


@pytest.mark.parametrize(
    "text, message",
    [
        ("127.0.0.2 slots=1\n127.0.0.3 slots = 2\n", "line 2 '127.0.0.3 slots = 2' is not '<host> slots=<N>'"),
        ("127.0.0.2 slots=1\n127.0.0.3 slots=0\n", "line 2 gives 127.0.0.3 no slots"),  # the launcher rejects both
        ("127.0.0.2 slots=1\n127.0.0.2 slots=1\n", "names 127.0.0.2 twice (line 2)"),
    ],
)
def test_preflight_names_a_hostfile_line_the_launcher_would_reject(text, message, tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    assert preflight_main(["--hostfile", str(hosts)]) == 2
    assert message in capsys.readouterr().err


def test_preflight_names_a_host_that_does_not_resolve(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 slots=1\nno-such-node.invalid slots=1\n")
    assert preflight_main(["--hostfile", str(hosts)]) == 2
    assert "host 'no-such-node.invalid'" in capsys.readouterr().err


def test_preflight_refuses_slots_the_pipeline_cannot_use(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 slots=2\n127.0.0.3 slots=1\n")
    assert (
        preflight_main(["--hostfile", str(hosts), "--deepspeed_config", str(REPO / "ds_configs" / "tiny_pp2.json")])
        == 2
    )
    assert "3 slots, which do not divide into 2 pipeline stages" in capsys.readouterr().err
    hosts.write_text("127.0.0.2 slots=2\n127.0.0.3 slots=2\n")
    assert (
        preflight_main(["--hostfile", str(hosts), "--deepspeed_config", str(REPO / "ds_configs" / "tiny_pp2.json")])
        == 0
    )


def train_with_env(small_config, out: Path, extra_env: dict, **flags):
    env = {**clean_env(), **extra_env}
    return subprocess.run(
        [sys.executable, "-m", "tnf_scale.train", *train_args(small_config, out, max_steps=2, **flags)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_slurm_allocation_that_does_not_fit_the_config_stops_before_training(small_config, tmp_path):
    slurm_env = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "3",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_ID": "41",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = train_with_env(small_config, tmp_path / "run", slurm_env, deepspeed_config="ds_configs/tiny_pp2.json")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "3 ranks in the SLURM allocation (SLURM_NTASKS) cannot be split into 2 pipeline stages" in proc.stderr


def test_a_master_port_in_use_is_named(small_config, tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = train_with_env(
            small_config,
            tmp_path / "run",
            {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"master port {port} is already in use" in proc.stderr


class FakeRunner:
    """A launcher process as psutil shows it: its command line and working directory."""

    def __init__(self, cmdline: list[str], cwd: str):
        self._cmdline, self._cwd = cmdline, cwd

    def cmdline(self) -> list[str]:
        return self._cmdline

    def cwd(self) -> str:
        return self._cwd


@pytest.mark.parametrize("spelling", [["--hostfile", "hosts"], ["--hostfile=hosts"], ["-H", "hosts"]])
def test_a_runner_given_a_missing_hostfile_is_refused_instead_of_training_on_one_node(spelling, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """deepspeed warns and starts only the local ranks when its hostfile does not exist; every rank now refuses."""
    from tnf_scale import preflight
    from tnf_scale.errors import ConfigError

    runner = FakeRunner(["/venv/bin/python", "/venv/bin/deepspeed", *spelling, "train.py"], str(tmp_path))
    monkeypatch.setattr(preflight, "launcher_chain", lambda: [runner])
    with pytest.raises(ConfigError, match="deepspeed was given --hostfile hosts, which does not exist"):
        preflight.check_runner_hostfile()
    (tmp_path / "hosts").write_text("127.0.0.2 slots=1\n")  # relative to the runner's directory, as it reads it
    preflight.check_runner_hostfile()
