"""The time-to-loss report on small synthetic metrics."""
from __future__ import annotations

import json
import sys

import matplotlib.image
import pytest

from tnf_scale.time_to_loss import Curve, compare, first_crossing, markdown, smooth

from conftest import REPO


def run(losses: list[float], seconds_per_step: float, every: int = 10) -> list[dict]:
    """metrics records: an eval every `every` steps (step 0 first), plus a training loss per eval step."""
    records = []
    for i, loss in enumerate(losses):
        step = i * every
        records.append({"step": step, "wall_time": step * seconds_per_step, "eval_loss_no_notes": loss})
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
    assert result.baseline == (50, 50.0) and result.tnf == (30, 33.0)
    assert result.step_saving == pytest.approx(0.4) and result.time_saving == pytest.approx(1 - 33.0 / 50.0)
    assert result.loss_gap_at_equal_steps == pytest.approx(-1.0) and result.gap_step == 50
    assert "40.0% sooner in steps" in result.verdict()
    assert result.tnf_with_notes is None and "notes read" not in markdown(result, "a", "b")


def test_tnfs_loss_with_notes_is_reported_beside_the_exported_models():
    tnf = run([9.0, 7.0, 6.0], seconds_per_step=1.0)
    for record, with_notes in zip((r for r in tnf if "eval_loss_no_notes" in r), (8.9, 6.5, 5.25)):
        record["eval_loss_notes"] = with_notes
    result = compare(run([9.0, 7.5, 6.5], seconds_per_step=1.0), tnf, window=1)
    assert result.tnf_with_notes == 5.25 and result.gap_step == 20
    assert "(`eval_loss_notes`, the model as trained, not as exported): 5.2500 at step 20" in markdown(result, "a", "b")


def test_default_target_is_the_baselines_final_smoothed_loss_and_failures_are_said_plainly():
    baseline = run([9.0, 7.0, 6.0, 5.0], seconds_per_step=1.0)
    result = compare(baseline, run([9.0, 8.5, 8.0, 7.5], 1.0), window=2)
    assert result.target == pytest.approx(5.5)
    assert result.tnf is None and result.step_saving is None
    assert "did not reach the target" in result.verdict()
    slower = compare(baseline, run([9.0, 7.0, 5.0, 4.0], seconds_per_step=3.0), target=5.0, window=1)
    assert slower.step_saving == pytest.approx(1 / 3) and slower.time_saving < 0
    assert "did not save wall time" in slower.verdict()


def test_report_writes_markdown_json_and_a_valid_png(tmp_path, monkeypatch, capsys):
    base_dir, tnf_dir = tmp_path / "base", tmp_path / "tnf"
    for path, records in ((base_dir, run([9.0, 8.0, 7.0, 6.0], 1.0)), (tnf_dir, run([9.0, 7.0, 6.0, 5.0], 1.2))):
        path.mkdir()
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sys.path.insert(0, str(REPO / "tools"))
    import time_to_loss as tool

    assert tool.main(["--baseline", str(base_dir), "--tnf", str(tnf_dir), "--out", str(tmp_path / "out"), "--window", "1"]) == 0
    image = matplotlib.image.imread(str(tmp_path / "out" / "time_to_loss.png"))
    assert image.shape[0] > 300 and image.shape[1] > 1000
    report = json.loads((tmp_path / "out" / "time_to_loss.json").read_text())
    assert report["baseline"] == [30, 30.0] and report["tnf"] == [20, 24.0]
    assert "| reaches the target | step 30, 30.0 s | step 20, 24.0 s |" in (tmp_path / "out" / "time_to_loss.md").read_text()
    assert markdown(compare(run([9.0], 1.0), run([9.5], 1.0)), "a", "b").count("never") == 1


def test_report_refuses_a_folder_without_a_run_in_one_sentence(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    import time_to_loss as tool
    from tnf_scale.config import exit_code

    (tmp_path / "tnf").mkdir()
    (tmp_path / "tnf" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_loss_no_notes": 9.0}) + "\n")
    argv = ["--baseline", str(tmp_path / "missing"), "--tnf", str(tmp_path / "tnf"), "--out", str(tmp_path / "out")]
    assert exit_code(lambda: tool.main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--baseline" in err and "missing" in err and "metrics.jsonl" in err
    assert not (tmp_path / "out").exists()
