"""Time-to-loss comparison of a baseline run and a TNF run, on the loss of the model as exported.

The target is a held-out loss (default: the baseline's final `eval_loss_no_notes`, smoothed);
each run's first step and wall time at which its smoothed `eval_loss_no_notes` reaches the
target give the saving in steps and in time. The paper's headline is a 60% saving.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tnf_scale.bench import finished_run
from tnf_scale.config import ConfigError
from tnf_scale.metrics import read_metrics

EVAL_KEY = "eval_loss_no_notes"
NOTES_KEY = "eval_loss_notes"  # TNF's held-out loss with its notes read: the model as trained, not as exported


@dataclass(frozen=True)
class Curve:
    steps: list[int]
    times: list[float]
    losses: list[float]


def eval_curve(records: list[dict], key: str = EVAL_KEY) -> Curve:
    """(step, wall time, loss) of every record holding `key`; step 0 has wall time 0."""
    rows = [(r["step"], r.get("wall_time", 0.0), r[key]) for r in records if key in r]
    return Curve([s for s, _, _ in rows], [t for _, t, _ in rows], [v for _, _, v in rows])


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def first_crossing(curve: Curve, target: float, window: int) -> tuple[int, float] | None:
    """(step, wall time) at which the smoothed loss first reaches `target`, or None if it never does."""
    for step, time, loss in zip(curve.steps, curve.times, smooth(curve.losses, window)):
        if loss <= target:
            return step, time
    return None


@dataclass(frozen=True)
class Comparison:
    target: float
    baseline: tuple[int, float] | None
    tnf: tuple[int, float] | None
    loss_gap_at_equal_steps: float | None  # TNF minus baseline at the last step both evaluated
    gap_step: int | None
    tnf_with_notes: float | None = None  # TNF's NOTES_KEY loss at gap_step, when it logged one

    @property
    def step_saving(self) -> float | None:
        """Share of the baseline's steps TNF did not need (0.6 is the paper's claim)."""
        if self.baseline is None or self.tnf is None or self.baseline[0] == 0:
            return None
        return 1 - self.tnf[0] / self.baseline[0]

    @property
    def time_saving(self) -> float | None:
        if self.baseline is None or self.tnf is None or self.baseline[1] == 0:
            return None
        return 1 - self.tnf[1] / self.baseline[1]

    def verdict(self) -> str:
        """One plain sentence: did TNF reach the target, and did it save time."""
        if self.baseline is None:
            return f"The baseline never reached the target loss {self.target:.4f}; choose a target it reaches."
        if self.tnf is None:
            return f"TNF did not reach the target loss {self.target:.4f} within its run: no saving shown."
        if self.time_saving is not None and self.time_saving <= 0:
            return (f"TNF reached the target loss {self.target:.4f} at step {self.tnf[0]} (baseline {self.baseline[0]}) "
                    f"but did not save wall time ({100 * self.time_saving:+.1f}%).")
        return (f"TNF reached the target loss {self.target:.4f} {100 * self.step_saving:.1f}% sooner in steps and "
                f"{100 * self.time_saving:.1f}% sooner in wall time than the baseline (the paper reports 60%).")


def compare(baseline: list[dict], tnf: list[dict], target: float | None = None, window: int = 3) -> Comparison:
    """Compare two runs' metrics records on the exported model's held-out loss."""
    base_curve, tnf_curve = eval_curve(baseline), eval_curve(tnf)
    if not base_curve.steps or not tnf_curve.steps:
        raise ConfigError(f"both runs need {EVAL_KEY} records and one has none; train them with --eval_interval below --max_steps.")
    if target is None:
        target = smooth(base_curve.losses, window)[-1]
    common = sorted(set(base_curve.steps) & set(tnf_curve.steps))
    gap = gap_step = with_notes = None
    if common:
        gap_step = common[-1]
        gap = tnf_curve.losses[tnf_curve.steps.index(gap_step)] - base_curve.losses[base_curve.steps.index(gap_step)]
        notes_curve = eval_curve(tnf, NOTES_KEY)
        with_notes = notes_curve.losses[notes_curve.steps.index(gap_step)] if gap_step in notes_curve.steps else None
    return Comparison(target, first_crossing(base_curve, target, window), first_crossing(tnf_curve, target, window), gap, gap_step,
                      with_notes)


def markdown(result: Comparison, baseline_dir: str, tnf_dir: str) -> str:
    """The report table and verdict as markdown."""
    def cell(point: tuple[int, float] | None) -> str:
        return "never" if point is None else f"step {point[0]}, {point[1]:.1f} s"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    gap = "n/a" if result.loss_gap_at_equal_steps is None else f"{result.loss_gap_at_equal_steps:+.4f} at step {result.gap_step}"
    return "\n".join([
        f"Target held-out loss (`{EVAL_KEY}`, the model as exported): {result.target:.4f}",
        "",
        "| | baseline | TNF |",
        "| --- | --- | --- |",
        f"| run | `{baseline_dir}` | `{tnf_dir}` |",
        f"| reaches the target | {cell(result.baseline)} | {cell(result.tnf)} |",
        "",
        f"Saving in steps: {pct(result.step_saving)}; in wall time: {pct(result.time_saving)}; "
        f"loss gap (TNF - baseline) at equal steps: {gap}.",
        *([f"TNF with its notes read (`{NOTES_KEY}`, the model as trained, not as exported): {result.tnf_with_notes:.4f} at step {result.gap_step}."]
          if result.tnf_with_notes is not None else []),
        "",
        result.verdict(),
        "",
    ])


def plot(baseline: list[dict], tnf: list[dict], result: Comparison, path: Path) -> Path:
    """PNG: held-out loss vs steps and vs wall time (target marked), and the training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for records, name in ((baseline, "baseline"), (tnf, "TNF")):
        curve = eval_curve(records)
        axes[0].plot(curve.steps, curve.losses, marker="o", label=name)
        axes[1].plot(curve.times, curve.losses, marker="o", label=name)
        notes = eval_curve(records, NOTES_KEY)
        if notes.steps:
            axes[0].plot(notes.steps, notes.losses, linestyle=":", label=f"{name}, notes read ({NOTES_KEY})")
            axes[1].plot(notes.times, notes.losses, linestyle=":", label=f"{name}, notes read ({NOTES_KEY})")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        axes[2].plot([s for s, _ in train], [v for _, v in train], label=name, linewidth=0.8)
    for ax, xlabel in zip(axes[:2], ("step", "wall time (s)")):
        ax.axhline(result.target, color="grey", linestyle="--", label=f"target {result.target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(EVAL_KEY)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss")
    for ax in axes:
        ax.legend()
    fig.suptitle(result.verdict(), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(baseline_dir: Path, tnf_dir: Path, out: Path, target: float | None = None, window: int = 3) -> str:
    """Compare two finished runs; write time_to_loss.md, .json and .png into `out`; return the markdown."""
    baseline, tnf = read_metrics(finished_run(baseline_dir, "--baseline")), read_metrics(finished_run(tnf_dir, "--tnf"))
    result = compare(baseline, tnf, target, window)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(result, str(baseline_dir), str(tnf_dir)) + "\n![time to loss](time_to_loss.png)\n"
    (out / "time_to_loss.md").write_text(report)
    (out / "time_to_loss.json").write_text(json.dumps({**dataclasses.asdict(result), "step_saving": result.step_saving,
                                                       "time_saving": result.time_saving, "verdict": result.verdict()}, indent=2) + "\n")
    plot(baseline, tnf, result, out / "time_to_loss.png")
    return report
