"""The throughput report: FLOP count, summaries, bad input (tests/test_bench.py runs it end to end)."""

from __future__ import annotations

import pytest

from tnf_scale.reports.throughput import electra_flops_per_token, flops_per_token, gpu_peak, gpu_state, summarize


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


def test_summary_takes_medians_and_spread():
    steps = [
        {"tokens_per_s": t, "step_seconds": s, "time_forward": f}
        for t, s, f in ((100.0, 2.0, 1.0), (300.0, 1.0, 0.5), (200.0, 4.0, 2.0))
    ]
    summary = summarize(steps, samples_per_step=8)
    assert summary["tokens_per_s"] == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert summary["samples_per_s"]["median"] == 4.0 and summary["step_seconds"] == 2.0
    assert summary["phase_seconds"]["forward"] == 1.0 and summary["phase_seconds"]["note_read"] == 0.0


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


def test_mfu_is_against_the_runs_own_gpus_times_its_ranks():
    from tnf_scale.reports.throughput import run_peak

    h100 = {"world_size": 16, "device": "NVIDIA H100 80GB HBM3"}
    assert run_peak(h100, {"bf16": 1.0}) == (16 * 989e12, "NVIDIA H100 80GB HBM3 dense bf16 peak x 16")
    peak, why = run_peak({"world_size": 2, "device": "NVIDIA RTX 9999"}, {"bf16": 1.0})
    assert peak is None and "no peak known for 'NVIDIA RTX 9999'" in why
    cpu = {"world_size": 2, "device": "cpu", "precision": "bf16"}
    assert run_peak(cpu, {"bf16": 5.0, "fp32": 1.0})[0] == 5.0  # a CPU run: this machine's peak in its precision


def test_throughput_report_refuses_a_folder_without_a_run(tmp_path):
    from tnf_scale.errors import ConfigError
    from tnf_scale.reports.throughput import write_report

    with pytest.raises(ConfigError, match=r"--peer .*nothing holds no run \(metrics.jsonl is missing\)"):
        write_report([], tmp_path / "nothing", tmp_path / "out", warmup=5)
    assert not (tmp_path / "out").exists()
