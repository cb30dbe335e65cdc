"""The throughput report: FLOP count, summaries, bad input (tests/test_bench.py runs it end to end)."""

from __future__ import annotations

import json

import pytest

from tnf_scale.model_flops import electra_flops_per_token, flops_per_token, gpu_peak
from tnf_scale.reports.throughput import gpu_state, summarize


def test_flops_for_bert_base_match_the_hand_computed_value():
    # per layer: 8*768^2 + 4*768*3072 + 4*128*768 = 14,548,992; x 12 = 174,587,904
    # head on every token: 2*768^2 + 2*768*30522 = 48,061,440; forward 222,649,344; x 3 for training
    assert flops_per_token(12, 768, 3072, 128, 30522, head_fraction=1.0) == 667_948_032
    assert flops_per_token(12, 768, 3072, 128, 30522, head_fraction=0.0) == 3 * 174_587_904


def test_flops_for_electra_base_match_the_hand_computed_value():
    # discriminator encoder 174,587,904 (as BERT-base);
    # generator encoder 12 * (8*256^2 + 4*256*1024 + 4*128*256) = 20,447,232;
    # the generator's 768 -> 256 embedding projection 393,216;
    # its head at the 15% masked tokens 0.15 * (2*256*768 + 2*768*30522) = 7,091,251.2;
    # the discriminator's head at every token 2*768^2 + 2*768 = 1,181,184
    generator = {
        "hidden_size": 256,
        "embedding_size": 768,
        "intermediate_size": 1024,
        "num_hidden_layers": 12,
        "vocab_size": 30522,
    }
    discriminator = {
        "hidden_size": 768,
        "embedding_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "vocab_size": 30522,
    }
    assert electra_flops_per_token(generator, discriminator, 128, 0.15) == pytest.approx(3 * 203_700_787.2)


def test_summary_takes_medians_and_spread_and_shares_of_the_total_that_add_up_to_the_step():
    """Tokens/s as median and spread; the anatomy as shares of the total time (planted: each phase's median over the
    median step, the old reading, gives these steps 0.9 + 0.9 = 180% of the step, as CI once saw in a real run)."""
    steps = [
        {"tokens_per_s": t, "step_seconds": s, "time_forward": f, "time_backward": b}
        for t, s, f, b in ((100.0, 1.0, 0.9, 0.1), (300.0, 1.0, 0.1, 0.9), (200.0, 4.0, 1.5, 1.5))
    ]
    summary = summarize(steps, samples_per_step=8)
    assert summary["tokens_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert summary["samples_per_s"]["median"] == 8.0 and summary["step_seconds"] == 1.0
    assert summary["phase_seconds"]["forward"] == pytest.approx(2.5 / 3) and summary["phase_seconds"]["note_read"] == 0
    shares = summary["phase_shares"]
    assert shares["forward"] == shares["backward"] == pytest.approx(2.5 / 6) and shares["rest"] == pytest.approx(1 / 6)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_the_math_a_run_computes_in(monkeypatch):
    import torch

    from tnf_scale.model_flops import compute_math

    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert compute_math("fp32", "cuda") == "tf32" and compute_math("bf16", "cuda") == "bf16"
    assert compute_math("fp32", "cpu") == "fp32"  # TF32 is a CUDA tensor-core format
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert compute_math("fp32", "cuda") == "fp32"


def test_gpu_peaks_by_exact_name_and_the_no_gpu_note():
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12 and gpu_peak("Some CPU") is None
    assert gpu_peak("NVIDIA H200") == 989e12  # matched no entry before: fell back to a CPU peak
    assert gpu_peak("NVIDIA L40S") == 362e12 and gpu_peak("NVIDIA L4") == 121e12  # "L40S" contains "L4"
    assert gpu_peak("NVIDIA H100 PCIe") == 756e12 < gpu_peak("NVIDIA H100 80GB HBM3")  # PCIe is not SXM
    assert gpu_peak("Tesla V100-SXM2-32GB") is None  # no native bf16: no bf16 peak to measure against
    from tnf_scale.distributed import gpus_listed

    state = gpu_state()  # as many GPUs as the driver lists (none here), each named, or the note that there are none
    assert len(state["gpus"]) == gpus_listed() and all(gpu["name"] for gpu in state["gpus"])
    if state["gpus"]:
        assert state["note"] == f"{len(state['gpus'])} GPU(s) seen by NVML"
    else:
        assert state["note"].startswith("no GPU: NVML is not available (")


def test_mfu_is_against_the_runs_own_gpus_times_its_ranks_in_the_math_it_computes_in():
    """bf16 runs against the bf16 tensor-core peak, fp32 runs with TF32 on against the TF32 one, fp32 runs with it off
    against the CUDA cores' (planted: every GPU run against the bf16 peak fails the fp32 cases)."""
    from tnf_scale.reports.throughput import run_peak

    h100 = {"world_size": 16, "device": "NVIDIA H100 80GB HBM3", "precision": "bf16", "math": "bf16"}
    assert run_peak(h100, {"bf16": 1.0}) == (16 * 989e12, "NVIDIA H100 80GB HBM3 dense bf16 peak x 16")
    a100 = {"world_size": 2, "device": "NVIDIA A100-SXM4-80GB", "precision": "fp32"}
    assert run_peak({**a100, "math": "tf32"}, {}) == (2 * 156e12, "NVIDIA A100-SXM4-80GB dense tf32 peak x 2")
    assert run_peak({**a100, "math": "fp32"}, {}) == (2 * 19.5e12, "NVIDIA A100-SXM4-80GB dense fp32 peak x 2")
    assert run_peak(a100, {})[0] == 2 * 19.5e12  # provenance from before the math was recorded: its precision
    peak, why = run_peak({"world_size": 2, "device": "NVIDIA RTX 9999", "precision": "bf16"}, {"bf16": 1.0})
    assert peak is None and "no bf16 peak known for 'NVIDIA RTX 9999'" in why
    assert run_peak({"device": "NVIDIA B200", "precision": "fp32"}, {})[0] is None  # no fp32 figure in the table
    cpu = {"world_size": 2, "device": "cpu", "precision": "bf16"}
    assert run_peak(cpu, {"bf16": 5.0, "fp32": 1.0})[0] == 5.0  # a CPU run: this machine's peak in its precision


def test_a_logged_steps_mfu_is_against_the_gpus_table_peak_times_the_ranks(tmp_path):
    """The training loop's per-step figures: model FLOP/s = FLOPs per token x tokens/s; MFU against the run's GPUs'
    dense bf16 peak x its ranks; none on a device without a table peak. The plain line says them."""
    from tnf_scale.model_flops import ModelRate
    from tnf_scale.progress_log import plain_line

    (tmp_path / "model_config.json").write_text(
        json.dumps({"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072, "vocab_size": 30522})
    )
    h100 = ModelRate.of_run(tmp_path, 128, 0.15, "NVIDIA H100 80GB HBM3", ranks=8)
    flops = flops_per_token(12, 768, 3072, 128, 30522, head_fraction=0.15)
    figures = h100.figures(tokens_per_s=1e6)
    assert figures == {
        "model_flops_per_s": pytest.approx(flops * 1e6),
        "mfu": pytest.approx(flops * 1e6 / (8 * 989e12)),
    }
    assert ModelRate.of_run(tmp_path, 128, 0.15, "cpu", ranks=2).figures(1e6).keys() == {"model_flops_per_s"}
    tf32 = ModelRate.of_run(tmp_path, 128, 0.15, "NVIDIA H100 80GB HBM3", ranks=8, math="tf32")
    assert tf32.figures(1e6)["mfu"] == pytest.approx(flops * 1e6 / (8 * 989e12 / 2))
    record = {"step": 7, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1e6, "grad_norm": 0.25, **figures}
    assert plain_line(record, 100) == (
        f"step 7/100 | loss 2.5000 | lr 0.0001 | 1,000,000 tokens/s | MFU {100 * figures['mfu']:.1f}% | grad norm 0.25"
    )


def test_throughput_report_refuses_a_folder_without_a_run(tmp_path):
    from tnf_scale.errors import ConfigError
    from tnf_scale.reports.throughput import write_report

    with pytest.raises(ConfigError, match=r"--peer .*nothing holds no run \(metrics.jsonl is missing\)"):
        write_report([], [tmp_path / "nothing"], tmp_path / "out", warmup=5)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--precisions", "bf16"], ["--with_peer"]])
def test_a_training_option_with_finished_runs_is_one_sentence_not_ignored(flag, tmp_path, capsys):
    """`--precisions` with `--run` was accepted and ignored: the report then said nothing of the precisions asked."""
    from tnf_scale.cli.throughput_report import main

    assert main(["--run", str(tmp_path / "run"), *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to the runs this tool trains with --preset" in err and err.count("\n") == 1


def test_metrics_go_to_weights_and_biases_when_asked_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    """With --wandb_project each record's scalars go to W&B at the record's step (the package faked: it is optional
    and not installed here); the W&B run id is kept in the run directory, so a resume logs into the same W&B run."""
    import sys
    from types import SimpleNamespace

    from tnf_scale.metrics import MetricsLogger

    calls = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return SimpleNamespace(log=lambda data, step: calls.append(("log", data, step)),
                               finish=lambda: calls.append(("finish",)))  # fmt: skip

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    logger = MetricsLogger(tmp_path, True, wandb_project="tnf", settings={"lr": 1e-3})
    logger.log({"step": 3, "loss": 2.5, "note": "text", "grad_norm": None})
    logger.close()
    first = calls[0][1]
    assert first["project"] == "tnf" and first["config"] == {"lr": 1e-3} and first["resume"] == "allow"
    assert calls[1:] == [("log", {"loss": 2.5}, 3), ("finish",)]
    MetricsLogger(tmp_path, True, resumed_step=3, wandb_project="tnf").close()
    assert calls[3][1]["id"] == first["id"] == (tmp_path / "wandb_id").read_text().strip()
    assert not MetricsLogger(tmp_path / "other", False, wandb_project="tnf").enabled and len(calls) == 5  # rank > 0


def fake_timing_run(path, flags: list[str], script: str) -> None:
    """A finished timing run as the tool's launches leave it: its settings, model, provenance and six logged steps,
    at a speed set by the trainer and its trial (the peer 100 tokens/s, tnf_scale 150 in trial 1 and 120 in trial 2),
    with the engine's phases of the step."""
    peer = "hf_peer" in script
    settings = dict(zip(flags[::2], flags[1::2]))
    speed = 100.0 if peer else {"trial1": 150.0, "trial2": 120.0}[path.parent.name]
    (path / "hf_trainer" if peer else path).mkdir(parents=True)
    (path / "run_config.json").write_text(
        json.dumps(
            {
                "preset": "tiny",
                "tnf": "off",
                "global_batch_size": int(settings["--global_batch_size"]),
                "micro_batch_size": 16,
                "max_seq_len": 128,
                "mlm_probability": 0.15,
                "compile": settings.get("--compile") == "true",
            }
        )
    )
    (path / "model_config.json").write_text(
        json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 256, "vocab_size": 1000})
    )
    (path / "provenance.json").write_text(
        json.dumps({"commit": "abc1234", "machine": "a test machine", "precision": "fp32", "world_size": 1})
    )
    step_seconds = 64 * 128 / speed
    phases = {"forward": 0.3, "backward": 0.5, "accumulation": 0.05, "reduction": 0.0, "optimizer": 0.1}
    records = [
        {"step": s, "loss": 5.0, "tokens_per_s": speed, "step_seconds": step_seconds}
        | {f"time_{p}": share * step_seconds for p, share in phases.items()}
        for s in range(1, 7)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_tool_trains_every_trainer_in_turn_at_64_sequences_a_step_and_reports_each_trial(tmp_path, monkeypatch):
    """Trials alternate the order (A B, then B A: planted, the same order every trial fails the order check), a
    timing run trains at least 64 sequences a step, and the report gives each trial's tokens/s, the ratio of the
    medians with the trial-by-trial spread, and the step's anatomy as shares."""
    from tnf_scale.cli import throughput_report

    order, flags_of = [], {}

    def launch(run_dir, ranks, port, flags, overwrite, script):
        order.append((run_dir.parent.name, run_dir.name))
        flags_of[run_dir.name] = flags
        fake_timing_run(run_dir, flags, script)
        return run_dir

    monkeypatch.setattr(throughput_report, "launch_training", launch)
    out = tmp_path / "tp"
    assert (
        throughput_report.main(["--preset", "tiny", "--steps", "6", "--warmup", "1", "--with_peer", "--out", str(out)])
        == 0
    )
    assert order == [("trial1", "run"), ("trial1", "hf_trainer"), ("trial2", "hf_trainer"), ("trial2", "run")]
    report = json.loads((out / "throughput.json").read_text())
    (run,) = report["runs"]
    assert run["global_batch_size"] == 64 and [t["tokens_per_s"] for t in run["trials"]] == [150.0, 120.0]
    assert run["tokens_per_s_over_peer"] == {"median": 1.35, "min": 1.2, "max": 1.5}
    shares = run["phase_shares"]
    assert shares["forward"] == pytest.approx(0.3) and shares["rest"] == pytest.approx(0.05)
    text = (out / "throughput.md").read_text()
    assert "| tokens/s ÷ HF Trainer | 1.35x (trials 1.20..1.50x) | 1.00x |" in text and "2 trials per trainer" in text
    assert "| tokens/s of each trial | 150, 120 | 100, 100 |" in text
    order.clear()  # a batch given is kept
    assert (
        throughput_report.main(
            [
                "--preset",
                "tiny",
                "--steps",
                "6",
                "--trials",
                "1",
                "--out",
                str(tmp_path / "one"),
                "--global_batch_size",
                "32",
            ]
        )
        == 0
    )
    assert order == [("trial1", "run")]
    assert json.loads((tmp_path / "one" / "throughput.json").read_text())["runs"][0]["global_batch_size"] == 32
    # eager against compiled, in turn, the peer eager (planted: the peer given the compiled run's flags fails)
    order.clear()
    args = ["--preset", "tiny", "--steps", "6", "--warmup", "1", "--compile_ab", "--with_peer", "--out"]
    assert throughput_report.main([*args, str(tmp_path / "ab")]) == 0
    assert [name for _, name in order] == [
        *["run_eager", "run_compiled", "hf_trainer"],
        *["hf_trainer", "run_compiled", "run_eager"],
    ]
    assert flags_of["run_compiled"][-2:] == ["--compile", "true"]
    assert flags_of["run_eager"][-2:] == ["--compile", "false"]
    assert "--compile" not in flags_of["hf_trainer"]
    assert [r["compiled"] for r in json.loads((tmp_path / "ab" / "throughput.json").read_text())["runs"]] == [
        False,
        True,
    ]
    assert (
        "| preset, TNF, precision | tiny, off, fp32 | tiny, off, fp32, compiled | tiny, off, fp32 |"
        in (tmp_path / "ab" / "throughput.md").read_text()
    )


def test_the_engine_clock_charges_each_phase_its_own_time_less_the_timed_calls_inside(monkeypatch):
    """A backward that holds the boundary reduction is charged without it, so the phases add up to the time in the
    engine (planted: not subtracting the inner call charges the backward 7 s and the sum passes 8 s)."""
    from tnf_scale import anatomy

    now = [0.0]
    monkeypatch.setattr(anatomy.time, "perf_counter", lambda: now[0])
    clock = anatomy.EngineClock()

    def work(seconds, inner=None):
        def method():
            now[0] += seconds
            if inner is not None:
                inner()

        return method

    backward = clock.timed("backward", work(5.0, clock.timed("reduction", work(2.0))))
    step = clock.timed("optimizer", work(1.0, clock.timed("optimizer", work(0.5))))
    backward(), step()
    taken = clock.take()
    assert taken == {"forward": 0.0, "backward": 5.0, "accumulation": 0.0, "reduction": 2.0, "optimizer": 1.5}
    assert sum(clock.take().values()) == 0.0  # taking starts again from zero
    assert anatomy.engine_split(9.0, taken) == {**taken, "engine_other": 0.5}


def test_the_step_anatomy_steps_both_models_in_turn_on_deepspeed_engines_and_splits_their_steps(tmp_path):
    """One process, the tiny preset: trials alternate (tnf_scale first, then the stock model first), every phase
    of both steps is timed inside the engines, the shares and the rest make the step, and the ratio is given trial by
    trial."""
    import sys

    from conftest import check_ok, run_cmd

    anatomy = [sys.executable, "tools/step_anatomy.py", "--preset", "tiny", "--steps", "1"]
    proc = run_cmd([*anatomy, "--out", str(tmp_path)])
    check_ok(proc)
    trials = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("trial ")]
    assert trials == ["trial 1, tnf_scale", "trial 1, stock", "trial 2, stock", "trial 2, tnf_scale"]
    result = json.loads((tmp_path / "anatomy.json").read_text())
    for model in result["models"].values():
        shares = model["phase_shares"]
        assert all(shares[p] > 0 for p in ("forward", "backward", "optimizer")) and model["steps"] == 2
        assert sum(shares.values()) == pytest.approx(1.0)
    assert result["accumulation_steps"] == 2 and len(result["tnf_scale_over_stock"]["trials"]) == 2
    assert "tnf_scale's tokens/s over the stock model's" in (tmp_path / "anatomy.md").read_text()


def test_the_tool_names_an_unknown_preset_before_it_claims_its_out_folder(tmp_path, capsys):
    """The preset's global batch is looked up through the settings' own resolution (planted: a lookup in PRESETS
    without the check fails with a KeyError's traceback)."""
    from tnf_scale.cli import throughput_report

    out = tmp_path / "tp"
    assert throughput_report.main(["--preset", "bert-huge", "--steps", "6", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'bert-huge'; choose one of" in err and "Traceback" not in err and not out.exists()
