"""The time-to-loss report on small synthetic metrics: every yardstick, crossings, savings, "never"."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from tnf_scale.reports.time_to_loss import (
    AS_TRAINED,
    EXPORTED,
    EXPORTED_OTHER,
    EXPORTED_RARE,
    Curve,
    compare,
    compare_all,
    first_crossing,
    markdown,
    smooth,
    split_by_token_kind,
)


def run(losses: list[float], seconds_per_step: float, every: int = 10, **curves: list[float]) -> list[dict]:
    """metrics records: an eval every `every` steps (step 0 first), plus a training loss per eval step;
    `curves` adds other eval keys (e.g. eval_loss_notes) at the same steps."""
    records = []
    for i, loss in enumerate(losses):
        step = i * every
        records.append(
            {
                "step": step,
                "wall_time": step * seconds_per_step,
                "eval_loss_no_notes": loss,
                **{key: values[i] for key, values in curves.items()},
            }
        )
        if step:
            records.append({"step": step, "loss": loss + 0.1, "wall_time": step * seconds_per_step})
    return records


def test_smoothing_is_a_trailing_mean():
    assert smooth([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_first_crossing_finds_the_step_and_time_or_never():
    curve = Curve([0, 10, 20, 30], [0.0, 5.0, 10.0, 15.0], [9.0, 7.0, 5.0, 4.0])
    assert first_crossing(curve, 5.0, window=1) == (20, 10.0)
    assert first_crossing(curve, 6.0, window=2) == (20, 10.0)  # smoothed: 9, 8, 6, 4.5
    assert first_crossing(curve, 5.9, window=2) == (30, 15.0)
    assert first_crossing(curve, 3.0, window=1) is None


def test_saving_in_steps_and_time():
    baseline = run([9.0, 8.0, 7.0, 6.0, 5.0, 4.0], seconds_per_step=1.0)  # reaches 4.0 at step 50
    tnf = run([9.0, 7.0, 5.0, 4.0, 3.5, 3.0], seconds_per_step=1.1)  # reaches 4.0 at step 30
    result = compare(baseline, tnf, target=4.0, window=1)
    assert result.yardstick is EXPORTED
    assert result.baseline == (50, 50.0) and result.tnf == (30, 33.0)
    assert result.step_saving == pytest.approx(0.4) and result.time_saving == pytest.approx(1 - 33.0 / 50.0)
    assert result.loss_gap_at_equal_steps == pytest.approx(-1.0) and result.gap_step == 50
    assert "40.0% sooner in steps" in result.verdict() and result.verdict().startswith("(b) model as exported")
    assert [r.yardstick for r in compare_all(baseline, tnf)] == [
        EXPORTED
    ]  # runs without notes or splits: one yardstick


def test_each_yardstick_has_its_own_target_crossing_and_verdict():
    # The baseline has no notes: its "as trained" loss is its exported loss.
    baseline = run(
        [9.0, 8.0, 7.0, 6.0],
        1.0,
        eval_loss_no_notes_rare=[10.0, 9.8, 9.6, 9.5],
        eval_loss_no_notes_other=[8.9, 7.9, 6.8, 5.8],
    )
    tnf = run(
        [9.0, 8.2, 7.2, 6.2],
        1.0,
        eval_loss_notes=[9.0, 7.0, 6.0, 5.0],  # leans on notes: fast with, slow without
        eval_loss_no_notes_rare=[10.0, 9.9, 9.9, 9.9],
        eval_loss_no_notes_other=[8.9, 7.5, 6.5, 5.8],
    )
    results = {r.yardstick: r for r in compare_all(baseline, tnf, window=1)}
    assert list(results) == [AS_TRAINED, EXPORTED, EXPORTED_OTHER, EXPORTED_RARE]
    as_trained = results[AS_TRAINED]
    assert as_trained.target == 6.0 and as_trained.baseline == (30, 30.0) and as_trained.tnf == (20, 20.0)
    assert as_trained.step_saving == pytest.approx(1 / 3) and as_trained.loss_gap_at_equal_steps == pytest.approx(-1.0)
    assert results[EXPORTED].tnf is None and "did not reach" in results[EXPORTED].verdict()
    other = results[EXPORTED_OTHER]
    assert other.target == 5.8 and other.tnf == (30, 30.0) and other.step_saving == 0.0
    assert results[EXPORTED_RARE].tnf is None and results[EXPORTED_RARE].loss_gap_at_equal_steps == pytest.approx(0.4)
    assert results[EXPORTED].target == 6.0 and compare_all(baseline, tnf, target=7.0, window=1)[1].target == 7.0


def test_split_by_token_kind_table_recombines_and_names_every_kind():
    baseline = run(
        [6.0],
        1.0,
        eval_loss_no_notes_rare=[9.5],
        eval_loss_no_notes_other=[5.8],
        eval_tokens_rare=[20],
        eval_tokens_other=[380],
    )
    tnf = run(
        [6.1],
        1.0,
        eval_loss_notes=[6.0],
        eval_loss_notes_rare=[9.6],
        eval_loss_notes_other=[5.8],
        eval_loss_no_notes_rare=[10.0],
        eval_loss_no_notes_other=[5.9],
        eval_tokens_rare=[20],
        eval_tokens_other=[380],
    )
    rows = split_by_token_kind(baseline, tnf, 0)
    assert [r["kind"] for r in rows] == ["all", "inside a rare span", "all other"]
    assert [r["tokens"] for r in rows] == [400, 20, 380]
    assert rows[1] == {
        "kind": "inside a rare span",
        "tokens": 20,
        "baseline": 9.5,
        "tnf_no_notes": 10.0,
        "tnf_notes": 9.6,
    }
    text = markdown(compare_all(baseline, tnf, window=1), rows, 0, "a", "b")
    assert "| inside a rare span | 20 | 9.5000 | 10.0000 | +0.5000 | 9.6000 |" in text
    assert "(d) downstream" in text and "at its target 6.0000 from step 0: no saving can be measured" in text


def test_default_target_is_the_baselines_final_smoothed_loss_and_failures_are_said_plainly():
    baseline = run([9.0, 7.0, 6.0, 5.0], seconds_per_step=1.0)
    result = compare(baseline, run([9.0, 8.5, 8.0, 7.5], 1.0), window=2)
    assert result.target == pytest.approx(5.5)
    assert result.tnf is None and result.step_saving is None
    assert "did not reach the baseline's 5.5000" in result.verdict()
    slower = compare(baseline, run([9.0, 7.0, 5.0, 4.0], seconds_per_step=3.0), target=5.0, window=1)
    assert slower.step_saving == pytest.approx(1 / 3) and slower.time_saving < 0
    assert "did not save wall time" in slower.verdict()


def test_report_writes_markdown_json_and_a_valid_png(tmp_path, monkeypatch, capsys):
    base_dir, tnf_dir = tmp_path / "base", tmp_path / "tnf"
    for path, records in ((base_dir, run([9.0, 8.0, 7.0, 6.0], 1.0)), (tnf_dir, run([9.0, 7.0, 6.0, 5.0], 1.2))):
        path.mkdir()
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from tnf_scale.cli import time_to_loss as tool

    assert (
        tool.main(["--baseline", str(base_dir), "--tnf", str(tnf_dir), "--out", str(tmp_path / "out"), "--window", "1"])
        == 0
    )
    image = matplotlib.image.imread(str(tmp_path / "out" / "time_to_loss.png"))
    assert image.shape[0] > 300 and image.shape[1] > 1000
    report = json.loads((tmp_path / "out" / "time_to_loss.json").read_text())
    (exported,) = report["yardsticks"]
    assert exported["baseline"] == [30, 30.0] and exported["tnf"] == [20, 24.0] and report["downstream"] is None
    assert (
        "| 6.0000 | step 30, 30.0 s | step 20, 24.0 s | 33.3% | 20.0% |"
        in (tmp_path / "out" / "time_to_loss.md").read_text()
    )
    assert markdown([compare(run([9.0], 1.0), run([9.5], 1.0))], [], None, "a", "b").count("never") == 1


def test_report_refuses_a_folder_without_a_run_in_one_sentence(tmp_path, capsys):
    from tnf_scale.cli import time_to_loss as tool
    from tnf_scale.errors import exit_code

    (tmp_path / "tnf").mkdir()
    (tmp_path / "tnf" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss_no_notes": 9.0}) + "\n")
    argv = ["--baseline", str(tmp_path / "missing"), "--tnf", str(tmp_path / "tnf"), "--out", str(tmp_path / "out")]
    assert exit_code(lambda: tool.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--baseline" in err and "missing" in err and "metrics.jsonl" in err
    assert not (tmp_path / "out").exists()


def test_one_run_given_twice_or_runs_the_wrong_way_round_are_refused(tmp_path, capsys):
    from tnf_scale.errors import exit_code
    from tnf_scale.reports.time_to_loss import write_report

    for name, tnf in (("base", "off"), ("tnf", "on")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run([9.0, 8.0], 1.0)))
        (tmp_path / name / "run_config.json").write_text(json.dumps({"tnf": tnf}))
    out = tmp_path / "out"
    assert exit_code(lambda: write_report(tmp_path / "base", tmp_path / "base", out) and 0) == 2
    assert "--baseline and --tnf both name" in capsys.readouterr().err
    assert exit_code(lambda: write_report(tmp_path / "tnf", tmp_path / "base", out) and 0) == 2
    assert "--baseline " in (err := capsys.readouterr().err) and "was trained with --tnf on" in err
    assert not out.exists()  # refused before anything was written
    assert "(b) model as exported: no notes" in write_report(
        tmp_path / "base", tmp_path / "tnf", out
    )  # the right pair is reported
