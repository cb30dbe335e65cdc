"""The bad-input campaign's judgement: what counts as a one-sentence refusal, a hang and a changed run."""

from __future__ import annotations

from tnf_scale.reports.input_campaign import Case, Outcome, refusal_of, run_case, summary


def test_library_lines_are_not_the_refusal_and_a_second_line_or_a_traceback_is_not_one_sentence():
    stderr = (
        "[2026-12-03 11:13:15,136] [INFO] [real_accelerator.py:254:get_accelerator] Setting ds_accelerator to cpu\n"
        "Generating train split: 3 examples [00:00, 908.84 examples/s]\n"
        "error: --max_steps must be at least 1, got 0.\n"
    )
    assert refusal_of(stderr) == "error: --max_steps must be at least 1, got 0."
    case = Case("flags", "x", lambda w: [])
    assert Outcome(case, 2, refusal_of(stderr), False).one_sentence
    assert not Outcome(case, 2, "usage: train.py [-h]\nerror: argument --lr: expected one argument", False).one_sentence
    assert not Outcome(case, 1, "error: x.", True).one_sentence and not Outcome(case, 0, "", False).one_sentence
    assert Outcome(case, None, "", False).hung


def test_a_case_that_changes_the_run_it_points_at_is_counted(tmp_path):
    """Planted: a command that rewrites a file of the watched run, as a wrongly accepted --overwrite would; the same
    command writing elsewhere leaves it unchanged."""
    run = tmp_path / "victim"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    source = tmp_path / "other.json"
    source.write_text('{"a": [1, 2, 3]}')
    watched = lambda w: w / "victim"  # noqa: E731
    elsewhere = run_case(Case("tools", "reads", lambda w: ["json.tool", str(source)], watched), tmp_path)
    rewrites = run_case(
        Case("tools", "rewrites", lambda w: ["json.tool", str(source), str(run / "metrics.jsonl")], watched), tmp_path
    )
    assert elsewhere.changed == [] and elsewhere.status == 0 and not elsewhere.one_sentence
    assert rewrites.changed == ["metrics.jsonl"]
    assert summary([elsewhere, rewrites])["total"] == {"cases": 2, "one_sentence": 0, "hangs": 0, "data_changed": 1}
