"""The throughput report: FLOP count, summaries, and an end-to-end run of the tool."""
from __future__ import annotations

import json
import sys

import pytest

from tnf_scale.throughput import flops_per_token, gpu_peak, gpu_state, summarize

from conftest import REPO, train_args


def test_flops_for_bert_base_match_the_hand_computed_value():
    # per layer: 8*768^2 + 4*768*3072 + 4*128*768 = 14,548,992; x 12 = 174,587,904
    # head on every token: 2*768^2 + 2*768*30522 = 48,061,440; forward 222,649,344; x 3 for training
    assert flops_per_token(12, 768, 3072, 128, 30522, head_fraction=1.0) == 667_948_032
    assert flops_per_token(12, 768, 3072, 128, 30522, head_fraction=0.0) == 3 * 174_587_904


def test_summary_takes_medians_and_spread():
    steps = [{"tokens_per_s": t, "step_seconds": s, "time_forward": f}
             for t, s, f in ((100.0, 2.0, 1.0), (300.0, 1.0, 0.5), (200.0, 4.0, 2.0))]
    summary = summarize(steps, samples_per_step=8)
    assert summary["tokens_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert summary["samples_per_s"]["median"] == 4.0 and summary["step_seconds"] == 2.0
    assert summary["phase_seconds"]["forward"] == 1.0 and summary["phase_seconds"]["note_read"] == 0.0


def test_gpu_peaks_and_the_no_gpu_note():
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12 and gpu_peak("Some CPU") is None
    state = gpu_state()
    assert state["gpus"] or state["note"].startswith("no GPU")


def test_throughput_report_runs_a_few_steps_of_the_tiny_preset(small_config, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import throughput_report

    out = tmp_path / "tp"
    args = train_args(small_config, out)
    flags = [x for key, value in zip(args[::2], args[1::2]) if key != "--output_dir" for x in (key, value)]
    assert throughput_report.main(["--preset", "tiny", "--steps", "6", "--warmup", "2", "--out", str(out), "--master_port", "29693", *flags]) == 0
    report = json.loads((out / "throughput.json").read_text())
    (result,) = report["runs"]
    assert report["peer"] is None and result["run"] == str(out / "run")
    assert result["steps"] == 4 and result["tokens_per_s"]["median"] > 0
    assert 0 < result["mfu"] < 1 and "measured now" in report["peak"] or report["gpus"]
    assert set(result["phase_seconds"]) == {"data", "note_read", "forward", "backward", "optimizer", "note_write"}
    assert result["phase_seconds"]["forward"] > 0 and result["timed_phases"]
    assert "| MFU |" in capsys.readouterr().out


def test_throughput_report_refuses_a_folder_without_a_run(tmp_path):
    from tnf_scale.config import ConfigError
    from tnf_scale.throughput import write_report

    with pytest.raises(ConfigError, match=r"--peer .*nothing holds no run \(metrics.jsonl is missing\)"):
        write_report([], tmp_path / "nothing", tmp_path / "out", warmup=5)
    assert not (tmp_path / "out").exists()
