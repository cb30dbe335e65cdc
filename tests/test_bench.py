"""`make bench`'s tool end to end on the small corpus: baseline, TNF, the Hugging Face Trainer peer, both reports."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, check_ok, free_port, run_cmd, train_args

from tnf_scale.config import parse_args
from tnf_scale.errors import ConfigError
from tnf_scale.metrics import read_metrics
from tnf_scale.run_dir import RunDir

pytestmark = pytest.mark.launcher


def step_records(run) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def test_bench_writes_both_reports_and_the_peer_trains_like_the_baseline(small_config, tmp_path, capsys):
    out = tmp_path / "bench"
    # One micro-batch a step, so both trainers average the loss over the same masked tokens.
    # --log_interval 50 lies beyond the run (as bert-base's 100 is beyond a timing run): the tool's runs still log
    # every step.
    args = train_args(
        small_config,
        out,
        max_steps=6,
        eval_interval=2,
        dropout=0.0,
        export="false",
        micro_batch_size=16,
        warmup_steps=2,
        log_interval=50,
    )
    flags = [x for key, value in zip(args[::2], args[1::2]) if key != "--output_dir" for x in (key, value)]
    check_ok(
        run_cmd(
            [
                os.sys.executable,
                "tools/bench_tnf.py",
                "--out",
                str(out),
                "--preset",
                "tiny",
                "--peer_steps",
                "6",
                "--warmup",
                "1",
                "--master_port",
                str(free_port()),
                "--downstream_points",
                "1",
                "--downstream_seeds",
                "1",
                "--downstream_examples",
                "64",
                "--downstream_eval_examples",
                "128",
                "--downstream_epochs",
                "1",
                *flags,
            ]
        )
    )

    report = (out / "report.md").read_text()
    origin = RunDir(out / "baseline").read_provenance()
    assert (
        origin["world_size"] == 1
        and origin["commit"]
        and f"Trained at commit {origin['commit']} on {origin['machine']}" in report
    )
    assert "## Time to loss" in report and "## Throughput" in report and (out / "time_to_loss.png").is_file()
    time_to_loss = json.loads((out / "time_to_loss.json").read_text())
    yardsticks = {y["yardstick"]: y for y in time_to_loss["yardsticks"]}
    assert list(yardsticks) == [
        "as_trained",
        "exported",
        "exported_other",
        "exported_rare",
    ]  # both runs log every split
    assert yardsticks["exported"]["baseline"] is not None and all(y["gap_step"] == 6 for y in yardsticks.values())
    assert [row["kind"] for row in time_to_loss["split"]] == [
        "all",
        "inside a rare span",
        "all other",
    ] and time_to_loss["split_step"] == 6
    # Time to score: both runs' last checkpoints exported and fine-tuned (several points are tested in
    # test_finetune.py).
    downstream = json.loads((out / "downstream.json").read_text())
    assert [r["step"] for r in downstream["baseline"]] == [r["step"] for r in downstream["tnf"]] == [6]
    for arm in ("baseline", "tnf"):  # every point the report scores is kept: none pruned by --keep_checkpoints
        assert json.loads((out / arm / "run_config.json").read_text())["keep_checkpoints"] == 0
    assert all(
        list(r["final"]) == ["1"] for r in downstream["baseline"] + downstream["tnf"]
    )  # several seeds: test_finetune.py
    assert downstream["target"] == downstream["baseline"][-1]["summary"]["accuracy"]["mean"] and downstream["verdict"]
    assert (
        time_to_loss["downstream"] == downstream["verdict"]
        and f"(d) downstream (fine-tuning score): {downstream['verdict']}" in report
    )
    assert "## Time to score (downstream)" in report and (out / "downstream.png").is_file()
    assert (out / "tnf" / "downstream" / "step00000006" / "export" / "model.safetensors").is_file()
    throughput = json.loads((out / "throughput.json").read_text())
    assert [r["tnf"] for r in throughput["runs"]] == ["off", "on"]
    peer_phases = throughput["peer"]["phase_seconds"]  # timed inside the peer's DeepSpeed engine too
    assert throughput["peer"]["timed_phases"] and peer_phases["forward"] > 0 and peer_phases["optimizer"] > 0
    # in bf16 (--precision auto on a CPU with native bf16) each micro-batch's gradients are added into fp32
    bf16 = throughput["peer"]["precision"] == "bf16"
    assert (peer_phases["accumulation"] > 0) == bf16
    ratio = throughput["runs"][0]["tokens_per_s"]["median"] / throughput["peer"]["tokens_per_s"]["median"]
    assert f"| tokens/s ÷ HF Trainer | {ratio:.2f}x |" in report
    tnf = throughput["runs"][1]
    assert (
        tnf["steps"] == 5
        and tnf["timed_phases"]
        and tnf["phase_seconds"]["forward"] > 0
        and tnf["phase_seconds"]["note_write"] > 0
        and (tnf["phase_seconds"]["accumulation"] > 0) == bf16
        and sum(tnf["phase_shares"].values()) == pytest.approx(1.0)
    )
    assert 0 < tnf["mfu"] < 1 and ("measured now" in throughput["peak"] or throughput["gpus"])

    # The throughput tool on its own, over finished runs, writes where --out says.
    from tnf_scale.cli import throughput_report

    assert (
        throughput_report.main(
            [
                "--run",
                str(out / "tnf"),
                "--peer",
                str(out / "hf_trainer"),
                "--out",
                str(tmp_path / "tp"),
                "--warmup",
                "1",
            ]
        )
        == 0
    )
    alone = json.loads((tmp_path / "tp" / "throughput.json").read_text())
    assert [r["run"] for r in alone["runs"]] == [str(out / "tnf")] and alone["peer"]["run"] == str(out / "hf_trainer")
    assert "| tokens/s ÷ HF Trainer |" in capsys.readouterr().out

    # Same initial weights, samples, masks and optimizer: the same losses, step after step.
    baseline, peer = step_records(out / "baseline"), step_records(out / "hf_trainer")
    assert sorted(peer) == sorted(baseline) == list(range(1, 7))
    assert [peer[s]["tokens"] for s in peer] == [baseline[s]["tokens"] for s in peer]
    assert max(abs(peer[s]["loss"] - baseline[s]["loss"]) for s in peer) < 1e-5
    assert baseline[6]["loss"] < baseline[1]["loss"] - 0.01  # it trained: the match is not two frozen models


def test_the_peer_logs_its_last_step_even_off_the_logging_schedule():
    from types import SimpleNamespace

    from transformers import TrainerControl

    from tnf_scale.anatomy import EngineClock
    from tnf_scale.reports.hf_peer import StepMetrics

    logged = []
    callback = StepMetrics(
        SimpleNamespace(log=logged.append), SimpleNamespace(step=lambda n: ([0, 1], None, None)), [5, 7], EngineClock()
    )
    callback.on_train_begin(None, None, None)
    for step, should_log in ((3, False), (4, True)):  # a 4-step run logging every 100 steps
        control = callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=4), TrainerControl())
        assert control.should_log is should_log
    callback.on_log(None, None, control, logs={"loss": 2.5, "learning_rate": 1e-3})
    assert [(r["step"], r["loss"], r["tokens"]) for r in logged] == [(4, 2.5, 24)]


def test_peer_refuses_a_pipeline_config_before_any_process_group(monkeypatch):
    from tnf_scale.reports import hf_peer

    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    cfg = parse_args(["--deepspeed_config", str(REPO / "ds_configs" / "tiny_pp2.json")])
    with pytest.raises(ConfigError, match="Hugging Face Trainer has no pipeline parallelism.*without pipeline.stages"):
        hf_peer.run(cfg)
