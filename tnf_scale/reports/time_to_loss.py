"""Time-to-loss comparison of a baseline run and a TNF run, on every loss yardstick the paper's claim rests on.

Each yardstick names the held-out loss of TNF compared with one of the baseline:
  (a) the model as trained: TNF with its notes read (leak-free; leaky only in a --notes_at_masked ablation), against
      the baseline (which has no notes);
  (b) the model as exported: no notes, for both;
  (c) the exported model on the predicted tokens outside rare spans, and on those inside rare spans.
The target of a yardstick is the baseline's final value (smoothed); each run's first step and wall
time at which its smoothed loss reaches it give the saving in steps and in time. The paper's
headline is a 60% saving. The downstream yardstick (d), fine-tuning scores, is measured by reports/downstream.py;
its verdict is quoted here when given.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tnf_scale.config import COMPARISON_MAY_DIFFER, config_conflict
from tnf_scale.errors import ConfigError
from tnf_scale.metrics import read_history
from tnf_scale.reports.bench import finished_run
from tnf_scale.run_dir import RunDir

EVAL_KEY = "eval_loss_no_notes"  # held-out loss of the model as exported
NOTES_KEY = "eval_loss_notes"  # TNF's held-out loss with its notes read: the model as trained
TOKEN_KINDS = (("", "all"), ("_rare", "inside a rare span"), ("_other", "all other"))


@dataclass(frozen=True)
class Yardstick:
    """What is compared: TNF's `tnf_key` against the baseline's `baseline_key`."""

    id: str
    name: str
    tnf_key: str
    baseline_key: str


AS_TRAINED = Yardstick(
    "as_trained", "(a) model as trained: notes read", NOTES_KEY, EVAL_KEY
)  # leak-free unless --notes_at_masked
EXPORTED = Yardstick("exported", "(b) model as exported: no notes", EVAL_KEY, EVAL_KEY)
EXPORTED_OTHER = Yardstick("exported_other", "(c) exported, non-rare tokens", f"{EVAL_KEY}_other", f"{EVAL_KEY}_other")
EXPORTED_RARE = Yardstick("exported_rare", "(c) exported, rare-span tokens", f"{EVAL_KEY}_rare", f"{EVAL_KEY}_rare")
YARDSTICKS = (AS_TRAINED, EXPORTED, EXPORTED_OTHER, EXPORTED_RARE)
DOWNSTREAM_NOTE = "not measured by this report; fine-tune both exports to see it"


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
    yardstick: Yardstick
    target: float
    baseline: tuple[int, float] | None
    tnf: tuple[int, float] | None
    loss_gap_at_equal_steps: float | None  # TNF minus baseline at the last step both evaluated
    gap_step: int | None

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
        """One plain sentence: on this yardstick, did TNF reach the target, and did it save time."""
        what = f"{self.yardstick.name}:"
        if self.baseline is None:
            return f"{what} the baseline never reached the target loss {self.target:.4f}; choose a target it reaches."
        if self.tnf is None:
            return f"{what} TNF did not reach the baseline's {self.target:.4f} within its run: no saving."
        if self.step_saving is None:
            return f"{what} the baseline was at its target {self.target:.4f} from step 0: no saving can be measured."
        if self.time_saving is not None and self.time_saving <= 0:
            return (
                f"{what} TNF reached {self.target:.4f} at step {self.tnf[0]} (baseline {self.baseline[0]}) "
                f"but did not save wall time ({100 * self.time_saving:+.1f}%)."
            )
        return (
            f"{what} TNF reached {self.target:.4f} {100 * self.step_saving:.1f}% sooner in steps and "
            f"{100 * self.time_saving:.1f}% sooner in wall time than the baseline (the paper reports 60%)."
        )

    def as_json(self) -> dict:
        return {
            "yardstick": self.yardstick.id,
            "name": self.yardstick.name,
            "tnf_key": self.yardstick.tnf_key,
            "baseline_key": self.yardstick.baseline_key,
            "target": self.target,
            "baseline": self.baseline,
            "tnf": self.tnf,
            "step_saving": self.step_saving,
            "time_saving": self.time_saving,
            "loss_gap_at_equal_steps": self.loss_gap_at_equal_steps,
            "gap_step": self.gap_step,
            "verdict": self.verdict(),
        }


def compare(
    baseline: list[dict], tnf: list[dict], yardstick: Yardstick = EXPORTED, target: float | None = None, window: int = 3
) -> Comparison:
    """Compare two runs' metrics records on one yardstick (target: the baseline's final smoothed value unless given)."""
    base_curve, tnf_curve = eval_curve(baseline, yardstick.baseline_key), eval_curve(tnf, yardstick.tnf_key)
    if not base_curve.steps or not tnf_curve.steps:
        raise ConfigError(
            f"both runs need {yardstick.baseline_key} / {yardstick.tnf_key} records and one has none; "
            "train them with --eval_interval below --max_steps (and TNF with --tnf on)."
        )
    if target is None:
        target = smooth(base_curve.losses, window)[-1]
    common = sorted(set(base_curve.steps) & set(tnf_curve.steps))
    gap = gap_step = None
    if common:
        gap_step = common[-1]
        gap = tnf_curve.losses[tnf_curve.steps.index(gap_step)] - base_curve.losses[base_curve.steps.index(gap_step)]
    return Comparison(
        yardstick,
        target,
        first_crossing(base_curve, target, window),
        first_crossing(tnf_curve, target, window),
        gap,
        gap_step,
    )


def logs(records: list[dict], key: str) -> bool:
    return any(key in r for r in records)


def compare_all(
    baseline: list[dict], tnf: list[dict], target: float | None = None, window: int = 3
) -> list[Comparison]:
    """Every yardstick both runs logged (the exported model's always; `target` is its target when given)."""
    return [
        compare(baseline, tnf, y, target if y is EXPORTED else None, window)
        for y in YARDSTICKS
        if y is EXPORTED or (logs(baseline, y.baseline_key) and logs(tnf, y.tnf_key))
    ]


def split_by_token_kind(baseline: list[dict], tnf: list[dict], step: int) -> list[dict]:
    """Held-out losses at `step` over all predicted tokens, those inside rare spans and the rest: baseline, TNF
    without notes, TNF with notes read."""

    def at(records: list[dict], key: str) -> float | None:
        return next((r[key] for r in records if r["step"] == step and key in r), None)

    rare, other = at(tnf, "eval_tokens_rare"), at(tnf, "eval_tokens_other")
    tokens = {"": None if rare is None or other is None else rare + other, "_rare": rare, "_other": other}
    return [
        {
            "kind": kind,
            "tokens": tokens[suffix],
            "baseline": at(baseline, EVAL_KEY + suffix),
            "tnf_no_notes": at(tnf, EVAL_KEY + suffix),
            "tnf_notes": at(tnf, NOTES_KEY + suffix),
        }
        for suffix, kind in TOKEN_KINDS
        if at(tnf, EVAL_KEY + suffix) is not None
    ]


def markdown(
    results: list[Comparison],
    split: list[dict],
    split_step: int | None,
    baseline_dir: str,
    tnf_dir: str,
    downstream: str | None = None,
) -> str:
    """The yardstick table, one verdict per yardstick, and the split by token kind, as markdown."""

    def cell(point: tuple[int, float] | None) -> str:
        return "never" if point is None else f"step {point[0]}, {point[1]:.1f} s"

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None, sign: str = "") -> str:
        return "n/a" if value is None else f"{value:{sign}.4f}"

    lines = [
        f"Baseline `{baseline_dir}`, TNF `{tnf_dir}`. Target of each yardstick: the baseline's final held-out "
        f"loss on it "
        "(trailing mean of the last evaluations); the paper reports 60% less pre-training time.",
        "",
        "| yardstick | TNF's loss vs the baseline's | target | baseline reaches | TNF reaches | saving in "
        "steps | saving in time | TNF - baseline at equal steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        y = r.yardstick
        gap = "n/a" if r.loss_gap_at_equal_steps is None else f"{r.loss_gap_at_equal_steps:+.4f} at step {r.gap_step}"
        lines.append(
            f"| {y.name} | `{y.tnf_key}` vs `{y.baseline_key}` | {r.target:.4f} | {cell(r.baseline)} | {cell(r.tnf)} | "
            f"{pct(r.step_saving)} | {pct(r.time_saving)} | {gap} |"
        )
    lines += [
        "",
        *(f"- {r.verdict()}" for r in results),
        f"- (d) downstream (fine-tuning score): {downstream or DOWNSTREAM_NOTE}",
        "",
    ]
    if split:
        lines += [
            f"Held-out loss at step {split_step}, split by the kind of predicted token:",
            "",
            "| predicted tokens | tokens | baseline | TNF, exported (no notes) | TNF - baseline | TNF, notes read |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in split:
            diff = (
                None
                if row["baseline"] is None or row["tnf_no_notes"] is None
                else row["tnf_no_notes"] - row["baseline"]
            )
            tokens = "" if row["tokens"] is None else f"{row['tokens']:,}"
            lines.append(
                f"| {row['kind']} | {tokens} | {num(row['baseline'])} | {num(row['tnf_no_notes'])} | "
                f"{num(diff, '+')} | "
                f"{num(row['tnf_notes'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(baseline: list[dict], tnf: list[dict], results: list[Comparison], path: Path, about: str, window: int) -> Path:
    """PNG: each yardstick's held-out loss over the second half of training, where the runs differ (both axes), with
    the target and the steps at which each run reaches it (its trailing mean of `window` evaluations, so a single
    point below the target is not yet a crossing); the exported model's against wall time; the training loss
    smoothed. `about` names the runs (RunDir.caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    panels = [(ax, r, "step") for ax, r in zip(axes.flat, results)]
    panels.append((axes.flat[len(results)], next(r for r in results if r.yardstick is EXPORTED), "wall time (s)"))
    for ax, result, xlabel in panels:
        y, by_time = result.yardstick, xlabel != "step"
        curves = [(eval_curve(baseline, y.baseline_key), "baseline"), (eval_curve(tnf, y.tnf_key), "TNF")]
        half = max(curve.steps[-1] for curve, _ in curves) / 2  # the early fall would flatten where the runs differ
        for curve, name in curves:
            shown = [(t if by_time else s, v) for s, t, v in zip(curve.steps, curve.times, curve.losses) if s >= half]
            ax.plot([x for x, _ in shown], [v for _, v in shown], marker="o", markersize=3, label=name)
        ax.axhline(result.target, color="grey", linestyle="--", label=f"target {result.target:.4f}")
        for reached, name, color in ((result.baseline, "baseline", "C0"), (result.tnf, "TNF", "C1")):
            if reached is not None and reached[0] >= half:
                x = reached[1] if by_time else reached[0]
                ax.axvline(x, color=color, linestyle=":", linewidth=1, label=f"{name} reaches it")
        saving = result.time_saving if by_time else result.step_saving
        ax.text(0.02, 0.97, "TNF never reaches the target" if saving is None else f"TNF saves {saving:.0%} of the "
                + ("time" if by_time else "steps"), transform=ax.transAxes, va="top", fontsize=9)  # fmt: skip
        ax.set_title(f"{y.name}{' against wall time' if by_time else ''}, second half of training", fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats)")
        ax.legend(fontsize=7, loc="upper right")
    train_ax = axes.flat[len(results) + 1]
    for records, name in ((baseline, "baseline"), (tnf, "TNF")):
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        mean_of = max(1, len(train) // 40)
        train_ax.plot([s for s, _ in train], smooth([v for _, v in train], mean_of), label=f"{name}, mean of {mean_of}")
    train_ax.set_title("training loss (TNF's with notes read), smoothed", fontsize=10)
    train_ax.set_xlabel("step")
    train_ax.set_ylabel("training loss (nats)")
    train_ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results) + 2 :]:
        ax.axis("off")
    fig.suptitle(
        f"Time to loss, baseline against TNF: {about}\na run reaches a target when the mean of its last {window} "
        "evaluations does (the points are single evaluations)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def check_pair(baseline_dir: Path, tnf_dir: Path) -> None:
    """Refuse a comparison that cannot mean anything: one run given twice, the TNF settings the wrong way round, or
    runs trained differently beyond TNF (config.COMPARISON_MAY_DIFFER)."""
    pair = (baseline_dir, tnf_dir)
    if baseline_dir.resolve() == tnf_dir.resolve():
        raise ConfigError(
            f"--baseline and --tnf both name {baseline_dir}; point --tnf at the TNF run and --baseline at the "
            f"--tnf off run."
        )
    for run, flag, wanted in ((baseline_dir, "--baseline", "off"), (tnf_dir, "--tnf", "on")):
        trained = RunDir(run).read_run_config().get("tnf") if RunDir(run).run_config.is_file() else wanted
        if trained != wanted:
            raise ConfigError(
                f"{flag} {run} was trained with --tnf {trained}; {flag} takes a run trained with --tnf {wanted}."
            )
    # the precision each computed in (provenance.json), not the flag: --precision auto is bf16 or fp32 by device
    saved = [
        {
            **RunDir(run).read_run_config(),
            **{k: v for k, v in RunDir(run).read_provenance().items() if k == "precision"},
        }
        if RunDir(run).run_config.is_file()
        else None
        for run in pair
    ]
    name = config_conflict(*saved, COMPARISON_MAY_DIFFER) if None not in saved else None
    if name is not None:
        raise ConfigError(
            f"--baseline {baseline_dir} was trained with --{name} {saved[0].get(name)} and --tnf {tnf_dir} with "
            f"--{name} {saved[1].get(name)}; compare runs that differ only in TNF's settings (same preset, data, "
            "model, batch, schedule, precision and seed)."
        )


def check_options(target: float | None, window: int) -> None:
    """The report's own options: a finite target loss, a trailing mean of at least one evaluation."""
    if target is not None and not math.isfinite(target):
        raise ConfigError(f"--target {target} is not a loss; give a finite held-out loss, or leave it out.")
    if window < 1:
        raise ConfigError(f"--window {window}: the trailing mean needs at least 1 evaluation.")


def check_runs(baseline_dir: Path, tnf_dir: Path) -> None:
    """Refuse, in one sentence, a pair that is not a finished baseline run and a finished TNF run."""
    finished_run(baseline_dir, "--baseline")
    finished_run(tnf_dir, "--tnf")
    check_pair(Path(baseline_dir), Path(tnf_dir))


def write_report(
    baseline_dir: Path,
    tnf_dir: Path,
    out: Path,
    target: float | None = None,
    window: int = 3,
    downstream: str | None = None,
) -> str:
    """Compare two finished runs on every yardstick; write time_to_loss.md, .json and .png into `out`; return the
    markdown.
    `downstream` is the verdict of the downstream yardstick when it was measured (reports/downstream.py)."""
    check_options(target, window)
    check_runs(baseline_dir, tnf_dir)
    baseline, tnf = read_history(Path(baseline_dir)), read_history(Path(tnf_dir))
    results = compare_all(baseline, tnf, target, window)
    split_step = next(r.gap_step for r in results if r.yardstick is EXPORTED)
    split = split_by_token_kind(baseline, tnf, split_step) if split_step is not None else []
    out.mkdir(parents=True, exist_ok=True)
    report = (
        markdown(results, split, split_step, str(baseline_dir), str(tnf_dir), downstream)
        + "\n![time to loss](time_to_loss.png)\n"
    )
    run = RunDir(baseline_dir)
    if run.run_config.is_file() and run.read_run_config().get("objective") == "electra":
        report = (
            "ELECTRA runs: every held-out loss here is the discriminator's (replaced-token detection, binary "
            "cross-entropy at every real position), the network that is kept.\n\n" + report
        )
    (out / "time_to_loss.md").write_text(report)
    (out / "time_to_loss.json").write_text(
        json.dumps(
            {
                "yardsticks": [r.as_json() for r in results],
                "split_step": split_step,
                "split": split,
                "downstream": downstream,
            },
            indent=2,
        )
        + "\n"
    )
    captions = RunDir(baseline_dir).caption(), RunDir(tnf_dir).caption()
    about = captions[0] if captions[0] == captions[1] else f"baseline {captions[0]}; TNF {captions[1]}"
    plot(baseline, tnf, results, out / "time_to_loss.png", about, window)
    return report
