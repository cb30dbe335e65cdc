"""Time to score: the downstream yardstick (d) of the paper's claim, as in its GLUE-vs-iterations panel.

Every complete checkpoint of the baseline and the TNF run is exported and fine-tuned on the shipped task with the
same seeds and settings (the exported plain model for both: `--notes none`). The target is the baseline's score at
its last checkpoint (mean over seeds); TNF's first checkpoint whose mean reaches it gives the saving in steps,
against the paper's 60%. The spread over seeds is reported beside every mean, so signal can be told from noise.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tnf_scale.checkpoint import CheckpointMarker, complete_checkpoints
from tnf_scale.finetune.run import FinetuneArgs, finetune
from tnf_scale.finetune.shipped import TASK, task_dir
from tnf_scale.finetune.tasks import TaskData, file_task
from tnf_scale.model.export import export_hf
from tnf_scale.run_dir import RunDir

PAPER_SAVING = 0.60
DOWNSTREAM_DIR = "downstream"  # in each run directory: downstream/stepNNNNNNNN/{export,finetune}


def shipped_task(data_cache: str | Path) -> TaskData:
    folder = task_dir(data_cache)
    return file_task(
        str(folder / "train.jsonl"), str(folder / "validation.jsonl"), "text", None, "label", "accuracy", TASK
    )


def score_run(run: Path, task: TaskData, settings: FinetuneArgs) -> list[dict]:
    """Per complete checkpoint of `run`: its step and the fine-tuning result (reused when already in the run)."""
    rows = []
    for ckpt in complete_checkpoints(run):
        step = CheckpointMarker.read(ckpt).step
        folder = run / DOWNSTREAM_DIR / ckpt.name
        result_file = folder / "finetune" / "finetune.json"
        if not result_file.is_file():
            export = export_hf(run, ckpt, folder / "export")
            finetune(task, FinetuneArgs(**{**vars(settings), "model": str(export), "out": str(folder / "finetune")}))
        rows.append({"step": step, **json.loads(result_file.read_text())})
    return rows


def mean_of(row: dict) -> float:
    return row["summary"][row["metrics"][0]]["mean"]


def std_of(row: dict) -> float:
    return row["summary"][row["metrics"][0]]["std"]


def time_to_score(baseline: list[dict], tnf: list[dict]) -> dict:
    """Target (the baseline's last mean score), TNF's first step reaching it and its saving in steps, and the gap at
    the last shared checkpoint against the seed spread: a gap no larger than either run's std is not told from noise."""
    target, final_step = mean_of(baseline[-1]), baseline[-1]["step"]
    reached = [row["step"] for row in tnf if mean_of(row) >= target]
    step = reached[0] if reached else None
    saving = None if step is None else 1.0 - step / final_step
    if step is None:
        verdict = f"TNF never reaches the baseline's final score {target:.4f} on this setup: no downstream saving."
    else:
        verdict = (
            f"TNF reaches the baseline's final score {target:.4f} at step {step} of {final_step}: a saving of "
            f"{100 * saving:.0f}% "
            f"in steps ({'at or beyond' if saving >= PAPER_SAVING else 'short of'} the paper's "
            f"{100 * PAPER_SAVING:.0f}%)."
        )
    tnf_by_step = {row["step"]: row for row in tnf}
    shared = [row for row in baseline if row["step"] in tnf_by_step]
    gap = spread = None
    if shared:
        base, mine = shared[-1], tnf_by_step[shared[-1]["step"]]
        gap, spread = mean_of(mine) - mean_of(base), max(std_of(base), std_of(mine))
        verdict += (
            f" At step {base['step']} TNF − baseline is {gap:+.4f} against a seed spread (std) of up to {spread:.4f}: "
            + ("larger than the spread." if abs(gap) > spread else "within the spread, so not told from noise.")
        )
    return {
        "target": target,
        "baseline_final_step": final_step,
        "tnf_step": step,
        "saving": saving,
        "gap_at_last_step": gap,
        "seed_spread_at_last_step": spread,
        "verdict": verdict,
    }


def markdown(baseline: list[dict], tnf: list[dict], verdict: dict, settings: FinetuneArgs) -> str:
    metric = baseline[-1]["metrics"][0]
    by_step = {row["step"]: row for row in tnf}
    lines = [
        f"Fine-tuned on the shipped task ({TASK}), seeds {', '.join(map(str, settings.seeds))}, lr {settings.lr}, "
        f"{settings.epochs:g} epochs, {settings.max_train_examples or 'all'} training examples, "
        f"{settings.max_eval_examples or 'all'} validation examples; validation {metric} (mean ± std over "
        f"seeds, final epoch).",
        "",
        f"| step | baseline {metric} | TNF {metric} | TNF − baseline |",
        "| --- | --- | --- | --- |",
    ]
    for row in baseline:
        other = by_step.get(row["step"])
        base = row["summary"][metric]
        cells = [f"{base['mean']:.4f} ± {base['std']:.4f}"]
        if other:
            mine = other["summary"][metric]
            cells += [f"{mine['mean']:.4f} ± {mine['std']:.4f}", f"{mine['mean'] - base['mean']:+.4f}"]
        else:
            cells += ["", ""]
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    majority = baseline[-1].get("majority_class")
    if majority is not None:
        lines += ["", f"Majority class: {majority:.4f}."]
    return "\n".join([*lines, "", f"**{verdict['verdict']}**", ""])


def plot(baseline: list[dict], tnf: list[dict], path: Path, about: str) -> Path:
    """PNG: the fine-tuned score of each checkpoint, mean ± std over the seeds, the two runs' bars side by side at the
    checkpoint steps, and the majority class; `about` names the runs (RunDir.caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = baseline[-1]["metrics"][0]
    seeds = len(baseline[-1]["final"])
    steps = sorted({r["step"] for r in [*baseline, *tnf]})
    shift = 0.015 * (steps[-1] - steps[0] or steps[-1])  # the two runs' error bars apart, not on top of each other
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rows, name, offset in ((baseline, "baseline", -shift), (tnf, "TNF", shift)):
        means = [r["summary"][metric]["mean"] for r in rows]
        stds = [r["summary"][metric]["std"] for r in rows]
        ax.errorbar([r["step"] + offset for r in rows], means, yerr=stds, marker="o", capsize=3, label=name)
    majority = baseline[-1].get("majority_class")
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle=":", label=f"majority class ({majority:.3f})")
    ax.set_xticks(steps)
    ax.set_xlabel("pre-training step of the fine-tuned checkpoint")
    ax.set_ylabel(f"{TASK} validation {metric}")
    title = f"Downstream: each checkpoint fine-tuned, mean ± std over {seeds} seeds\n{textwrap.fill(about, 90)}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    baseline_run: Path, tnf_run: Path, out: Path, data_cache: str | Path, settings: FinetuneArgs
) -> tuple[str, str]:
    """Fine-tune every checkpoint of both runs (reusing results already there) and write downstream.{md,json,png};
    return the markdown and the verdict sentence."""
    task = shipped_task(data_cache)
    baseline, tnf = score_run(baseline_run, task, settings), score_run(tnf_run, task, settings)
    verdict = time_to_score(baseline, tnf)
    text = markdown(baseline, tnf, verdict, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "downstream.md").write_text(text)
    (out / "downstream.json").write_text(json.dumps({"baseline": baseline, "tnf": tnf, **verdict}, indent=1) + "\n")
    plot(baseline, tnf, out / "downstream.png", f"baseline and TNF: {RunDir(baseline_run).caption()}")
    return text, verdict["verdict"]
