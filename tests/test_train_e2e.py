"""End to end: the real `deepspeed` launcher and `python -m`, TNF and baseline, resume, export."""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_export_is_the_model_in_training, check_ok, launch, run_cmd, train_args
from safetensors.torch import load_file
from transformers import BertForMaskedLM, pipeline

from tnf_scale.checkpoint import CheckpointMarker, latest_complete
from tnf_scale.metrics import read_metrics
from tnf_scale.notes.note_math import initial_notes
from tnf_scale.run_dir import RunDir

STEP_FIELDS = {
    "step",
    "loss",
    "lr",
    "tokens",
    "wall_time",
    "step_seconds",
    "tokens_per_s",
    "grad_norm",
    "model_flops_per_s",
    "occurrences_read",
    "occurrences_skipped_masked",
    "notes_written",
    "distinct_noted",
}
SPLIT_FIELDS = {"eval_loss_no_notes_rare", "eval_loss_no_notes_other", "eval_tokens_rare", "eval_tokens_other"}
pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def tnf_run(small_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tnf_run")
    launch(
        1,
        ["tnf_scale/train.py", *train_args(small_config, out, max_steps=40, save_interval=20)],
        through_deepspeed=True,
    )
    return out


@pytest.fixture(scope="module")
def baseline_run(small_config, tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("baseline_run")
    proc = run_cmd([sys.executable, "-m", "tnf_scale.train", *train_args(small_config, out, max_steps=40, tnf="off")])
    check_ok(proc)
    return out, proc.stdout, proc.stderr


def test_tnf_run_under_the_deepspeed_launcher_learns_and_takes_notes(tnf_run, prepared):
    records = read_metrics(tnf_run)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(set(r) >= STEP_FIELDS for r in steps)
    first, last = sum(r["loss"] for r in steps[:5]) / 5, sum(r["loss"] for r in steps[-5:]) / 5
    assert last < first - 0.5, (first, last)
    evals = [r for r in records if "eval_loss_no_notes" in r]
    assert [r["step"] for r in evals] == [0, 20, 40] and all("eval_loss_notes" in r for r in evals)
    assert evals[-1]["eval_loss_no_notes"] < evals[0]["eval_loss_no_notes"]
    # Every occurrence writes; those whose span holds a predicted token read no note (docs/design.md).
    assert all(
        r["occurrences_read"] > 0 and r["occurrences_read"] + r["occurrences_skipped_masked"] == r["notes_written"]
        for r in steps
    )
    assert sum(r["occurrences_skipped_masked"] for r in steps) > 0
    for r in evals:  # the logged split recombines into the overall loss, with notes and without
        assert SPLIT_FIELDS | {"eval_loss_notes_rare", "eval_loss_notes_other"} <= set(r) and r["eval_tokens_rare"] > 0
        for name in ("eval_loss_no_notes", "eval_loss_notes"):
            recombined = (r["eval_tokens_rare"] * r[f"{name}_rare"] + r["eval_tokens_other"] * r[f"{name}_other"]) / (
                r["eval_tokens_rare"] + r["eval_tokens_other"]
            )
            assert abs(recombined - r[name]) < 1e-6
    assert steps[-1]["distinct_noted"] > steps[0]["distinct_noted"] > 0

    notes = load_file(str(tnf_run / "notes.safetensors"))
    assert notes["ids"].dtype == torch.int64 and torch.equal(notes["ids"], torch.arange(len(prepared.rare_vocab)))
    start = initial_notes(notes["ids"], notes["vectors"].shape[1], seed=1234, std=0.02)
    changed = (notes["vectors"] != start).any(dim=1)
    assert int(changed.sum()) == steps[-1]["distinct_noted"]  # exactly the noted words moved
    assert (tnf_run / "tensorboard").is_dir() and any((tnf_run / "tensorboard").iterdir())


def test_export_is_the_model_in_training_as_a_stock_bert_with_no_notes(tnf_run, prepared, small_config):
    """No note tensor in the export, every key of a stock BertForMaskedLM present, and the held-out loss the run
    measured at its last step; the fill-mask pipeline runs on it."""
    export = tnf_run / "export"
    weights = load_file(str(export / "model.safetensors"))
    assert not [name for name in weights if "note" in name.lower()]
    assert_export_is_the_model_in_training(tnf_run, prepared, small_config)
    fill = pipeline("fill-mask", model=BertForMaskedLM.from_pretrained(str(export)), tokenizer=str(export))
    assert len(fill("in the beginning god created the [MASK] and the earth.")) == 5


def test_resume_continues_exactly_where_the_checkpoint_left_off(tnf_run, small_config, tmp_path):
    """Bit for bit, with the data prepared anew: the corpus copied to another path, an empty data cache and no
    --tokenizer (which would train one), so the resume must encode with the run's own tokenizer, and its tokenizer
    files are left as they were. Planted: preparing as a fresh run does trains another tokenizer (its ids differ,
    its rare words do not), the losses move and the run's tokenizer.json is rewritten."""
    resumed = tmp_path / "resumed"
    shutil.copytree(tnf_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000040")  # as if the run died after step 20's checkpoint
    assert latest_complete(resumed).name == "step00000020"
    tokenizer_files = {p.name: p.read_bytes() for p in (resumed / "tokenizer").iterdir()}
    moved = tmp_path / "moved" / Path(small_config.corpus[0]).name
    moved.parent.mkdir()
    moved.write_bytes(Path(small_config.corpus[0]).read_bytes())
    elsewhere = dataclasses.replace(
        small_config, corpus=[str(moved)], data_cache=str(tmp_path / "cache"), tokenizer=None
    )
    # The run collated each step on the spot (--prefetch auto on a CPU); the resumed one prefetches: the same batches.
    launch(
        1,
        [
            "tnf_scale/train.py",
            *train_args(elsewhere, resumed, max_steps=40, save_interval=20, resume="true", prefetch="on"),
        ],
    )
    assert {p.name: p.read_bytes() for p in (resumed / "tokenizer").iterdir()} == tokenizer_files
    assert (resumed / "export" / "tokenizer.json").read_bytes() == (tnf_run / "export" / "tokenizer.json").read_bytes()
    original = {r["step"]: r for r in read_metrics(tnf_run)}
    again = read_metrics(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in read_metrics(tnf_run)]  # no step logged twice
    # bit for bit: the first update after step 20 is one whose Adam bias correction DeepSpeed's CPU op computes
    # otherwise in a fresh process (beta2^21), which the resume's replay of its steps undoes (cpu_adam.py)
    for r in again:
        if r["step"] > 20 and "loss" in r:
            assert r["loss"] == original[r["step"]]["loss"], r["step"]
    a, b = load_file(str(tnf_run / "notes.safetensors")), load_file(str(resumed / "notes.safetensors"))
    assert torch.equal(b["vectors"], a["vectors"])
    assert CheckpointMarker.read(resumed / "checkpoints" / "step00000040").step == 40


def test_baseline_run_via_python_m_takes_no_notes(baseline_run):
    out, stdout, _ = baseline_run
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 40 and all(set(r) >= STEP_FIELDS for r in steps)
    assert all(r["notes_written"] == 0 and r["distinct_noted"] == 0 for r in steps)
    assert all("eval_loss_notes" not in r for r in records) and SPLIT_FIELDS | {"eval_loss_no_notes"} <= set(
        records[-1]
    )
    assert not (out / "notes.safetensors").exists()
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert "TNF off" in stdout and (out / "export" / "model.safetensors").is_file()


def test_a_run_logged_to_a_file_prints_a_plain_line_per_logged_step(baseline_run):
    """Output that is not a terminal (a batch job's .out file) gets one plain line per logged step, with the gradient
    norm the record holds and no progress bar; the record's model FLOP/s are the throughput report's FLOPs per token
    times its tokens/s. Planted: the bar left on off a terminal puts carriage returns into stderr; the plain lines
    left off fails the count."""
    from tnf_scale.model_flops import run_flops_per_token

    out, stdout, stderr = baseline_run
    steps = [r for r in read_metrics(out) if "loss" in r]
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and " | loss " in line]
    assert len(lines) == len(steps) == 40
    last = steps[-1]
    assert lines[-1].startswith(f"step 40/40 | loss {last['loss']:.4f} | lr ")
    assert f"| grad norm {last['grad_norm']:.3g}" in lines[-1] and "| held-out loss " in lines[-1]
    assert all(r["grad_norm"] > 0 for r in steps) and "mfu" not in last  # no table peak for a CPU: no MFU
    config = RunDir(out).read_run_config()
    flops = run_flops_per_token(out, config["max_seq_len"], config["mlm_probability"])
    assert last["model_flops_per_s"] == pytest.approx(flops * last["tokens_per_s"], rel=1e-12)
    assert "\r" not in stderr and "step/s" not in stderr and "s/step" not in stderr


def test_a_second_run_into_the_same_directory_is_refused(baseline_run, small_config):
    out, _, _ = baseline_run
    before = (out / "metrics.jsonl").read_bytes()
    proc = run_cmd([sys.executable, "-m", "tnf_scale.train", *train_args(small_config, out, max_steps=5, tnf="off")])
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


def test_overwrite_with_a_mistyped_corpus_keeps_the_old_run(baseline_run, small_config, tmp_path):
    out, _, _ = baseline_run
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    args = train_args(small_config, out, max_steps=5, tnf="off", overwrite="true", corpus=str(tmp_path / "typo.jsonl"))
    proc = run_cmd([sys.executable, "-m", "tnf_scale.train", *args])
    assert proc.returncode == 2 and "typo.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing deleted or rewritten


def test_resume_without_a_checkpoint_says_so(small_config, tmp_path):
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "tnf_scale.train",
            *train_args(small_config, tmp_path / "fresh", max_steps=5, resume="true"),
        ]
    )
    assert proc.returncode == 2 and "found no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_export_tool_rebuilds_the_export_and_names_a_run_without_checkpoints(tnf_run, tmp_path, capsys):
    from tnf_scale.cli import export as export_tool

    assert export_tool.main(["--run", str(tnf_run), "--out", str(tmp_path / "again")]) == 0
    a, b = (
        load_file(str(tnf_run / "export" / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert export_tool.main(["--run", str(tmp_path / "empty")]) == 2
    assert "is not a run's output directory" in capsys.readouterr().err
    (tmp_path / "young").mkdir()
    (tmp_path / "young" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a run before its 1st checkpoint
    assert export_tool.main(["--run", str(tmp_path / "young")]) == 2
    assert "holds no complete checkpoint yet" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("keep me")
    assert export_tool.main(["--run", str(tnf_run), "--out", str(tmp_path / "a_file")]) == 2
    assert "is a file; name a directory" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "keep me"
