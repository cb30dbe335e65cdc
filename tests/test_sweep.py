"""The sweep tool: grid parsing, shared baselines, reuse of finished runs, and its table (no training needed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tnf_scale.cli import tnf_sweep
from tnf_scale.errors import ConfigError, exit_code
from tnf_scale.reports.sweep import Setting, finished_run_of, grid, parse_axis, run_config


def test_axes_parse_into_field_values_and_grids_are_products():
    assert parse_axis("note_lambda=0.25,0.5") == [(("note_lambda", "0.25"),), (("note_lambda", "0.5"),)]
    assert parse_axis("rare_min_count:rare_max_count=5:25,10:50") == [
        (("rare_min_count", "5"), ("rare_max_count", "25")),
        (("rare_min_count", "10"), ("rare_max_count", "50")),
    ]
    settings = grid(["note_lambda=0.25,0.5", "rare_min_count:rare_max_count=5:25,10:50"], "tiny", [])
    assert len(settings) == 4 and settings[1].name == "note_lambda=0.25,rare_min_count=10,rare_max_count=50"
    # lambda only changes what notes do: the baseline is shared; the band changes the baseline's rare-span yardstick
    assert settings[1].shared() == Setting((("rare_min_count", "10"), ("rare_max_count", "50")))
    assert len({s.shared() for s in settings}) == 2 and "/" not in settings[0].tag


@pytest.mark.parametrize(
    "axis,message",
    [
        ("note_lambda", "is not FIELD=V1,V2"),
        ("learning_rate=1", "'learning_rate', which is not a training flag"),
        ("rare_min_count:rare_max_count=5", "has 1 parts for 2 fields"),
        ("note_lambda=0.5,2", "note_lambda must lie strictly between 0 and 1"),
        ("tnf=on,off", "sweeps 'tnf', which the sweep sets itself"),
        ("output_dir=a,b", "sweeps 'output_dir', which the sweep sets itself"),
        ("seed:overwrite=1:true,2:false", "sweeps 'overwrite', which the sweep sets itself"),
        ("resume=never", "sweeps 'resume', which the sweep sets itself"),
    ],
)
def test_bad_axes_are_refused_in_one_sentence_before_anything_trains(axis, message):
    """Axes the sweep sets itself were accepted and then ignored or fatal (a baseline trained into a folder named by
    the axis, relative to the package's checkout)."""
    with pytest.raises(ConfigError, match=message):
        grid([axis], "tiny", [])


def test_a_field_in_two_grids_or_a_flag_the_sweep_sets_is_refused_instead_of_silently_losing():
    with pytest.raises(ConfigError, match="both sweep 'seed'; give each field in one --grid"):
        grid(["seed=1,2", "note_lambda:seed=0.5:3"], "tiny", [])
    for flags, name in ((["--tnf", "off"], "--tnf"), (["--max_steps", "5", "--output_dir=runs/x"], "--output_dir")):
        with pytest.raises(ConfigError, match=f"^{name} is set by the sweep itself"):
            grid(["seed=1"], "tiny", flags)


def fake_run(path, cfg, steps: list[int], losses: list[float], commit: str = "abc1234", **curves):
    path.mkdir(parents=True)
    (path / "provenance.json").write_text(json.dumps({"commit": commit, "machine": "a test machine"}))
    (path / "run_config.json").write_text(
        json.dumps({**dataclasses.asdict(cfg), "output_dir": str(path), "overwrite": True})
    )
    records = [
        {"step": s, "wall_time": float(s), "eval_loss_no_notes": v, **{k: c[i] for k, c in curves.items()}}
        for i, (s, v) in enumerate(zip(steps, losses))
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_finished_runs_are_reused_only_when_trained_exactly_as_needed(tmp_path):
    cfg = run_config("tiny", ["--max_steps", "20"], Setting((("note_lambda", "0.25"),)), "on")
    run = fake_run(tmp_path / "a", cfg, [0, 10, 20], [9.0, 8.0, 7.0])
    assert finished_run_of(cfg, [tmp_path / "missing", run]) == run
    assert finished_run_of(dataclasses.replace(cfg, note_lambda=0.5), [run]) is None
    assert finished_run_of(dataclasses.replace(cfg, max_steps=30), [run]) is None  # not finished at 30
    assert finished_run_of(dataclasses.replace(cfg, output_dir="elsewhere", resume=True), [run]) == run


def test_sweep_tool_shares_the_baseline_and_tables_every_yardstick(tmp_path, capsys):
    flags = ["--max_steps", "20"]
    base = fake_run(
        tmp_path / "base",
        run_config("tiny", flags, Setting(()), "off"),
        [0, 10, 20],
        [9.0, 8.0, 7.0],
        eval_loss_no_notes_rare=[10.0, 9.5, 9.4],
        eval_loss_no_notes_other=[8.9, 7.9, 6.9],
    )
    runs = [base]
    # lambda 0.25 logs its note writes: 60 rare occurrences of 20 noted words, each seen 3 times on average
    writes = {"notes_written": [0.0, 30.0, 30.0], "distinct_noted": [0.0, 10.0, 20.0]}
    for lam, losses, logged in (("0.25", [9.0, 7.5, 6.9], writes), ("0.5", [9.0, 8.1, 7.2], {})):
        cfg = run_config("tiny", flags, Setting((("note_lambda", lam),)), "on")
        runs.append(
            fake_run(
                tmp_path / f"tnf{lam}",
                cfg,
                [0, 10, 20],
                losses,
                commit="def5678",
                eval_loss_notes=[9.0, 7.0, 6.5],
                eval_loss_no_notes_rare=[10.0, 9.6, 9.5],
                eval_loss_no_notes_other=[8.9, 7.4, 6.8],
                **logged,
            )
        )
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--preset", "tiny", "--grid", "note_lambda=0.25,0.5", "--reuse", *map(str, runs), *flags]
    assert tnf_sweep.main(argv) == 0  # everything reused: nothing launched
    text = (out / "sweep.md").read_text()
    assert "runs trained at commit abc1234, def5678 on a test machine." in text  # every run's commit, not one
    # Trailing means of 3: the baseline's target is 8.0 (exported), 7.9 (other), 9.63 (rare); TNF with notes reaches 8.0
    # at step 10 (mean 8.0), exported and other only at step 20, rare never.
    assert (
        f"| note_lambda=0.25 | `{base}` | 3.0 | -0.5000, saves 50% | -0.1000, saves 0% | -0.1000, saves 0% | "
        "+0.1000, never |" in text
    )
    assert f"| note_lambda=0.5 | `{base}` | n/a | " in text and "+0.2000, never" in text
    summary = json.loads((out / "sweep.json").read_text())
    assert [row["baseline"] for row in summary["rows"]] == [str(base)] * 2
    assert [row["rare_exposure"] for row in summary["rows"]] == [3.0, None]
    assert (out / "report-note_lambda-0.25" / "time_to_loss.png").is_file()
    assert exit_code(lambda: tnf_sweep.main(["--out", str(out), "--grid", "note_gamma=3"])) == 2
    assert "note_gamma must lie strictly between 0 and 1" in capsys.readouterr().err
