"""Where notes pay: TNF over a grid of settings against the baseline, one table of the time-to-loss yardsticks.

A grid is a product of axes, each `field=v1,v2` over RunConfig fields, or `a:b=x1:y1,x2:y2` for fields
that go together (a rare band). Axes that change only what notes do (TNF_ONLY) share one baseline;
every other axis (data, rare band, model, steps) changes the baseline or its rare-span yardstick, so
the baseline runs once per value of those. A finished run whose configuration equals the one a
setting needs is reused instead of trained again.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from tnf_scale.config import RUN_ONLY, TNF_ONLY, RunConfig, parse_args
from tnf_scale.errors import ConfigError
from tnf_scale.metrics import read_metrics
from tnf_scale.reports.time_to_loss import YARDSTICKS, Comparison, compare_all
from tnf_scale.run_dir import RunDir

# what the sweep decides for every run it trains: TNF on against off, and where and how each run is written
SET_BY_THE_SWEEP = ("tnf", "output_dir", "overwrite", "resume")


@dataclass(frozen=True)
class Setting:
    """One point of the grid: flag values as given on the command line."""

    values: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values) or "defaults"

    @property
    def tag(self) -> str:
        """A directory-safe name."""
        return "_".join(f"{k}-{v}" for k, v in self.values).replace("/", "-") or "defaults"

    def flags(self) -> list[str]:
        return [x for k, v in self.values for x in (f"--{k}", v)]

    def shared(self) -> Setting:
        """The part of the setting the baseline depends on."""
        return Setting(tuple((k, v) for k, v in self.values if k not in TNF_ONLY))


def parse_axis(text: str) -> list[tuple[tuple[str, str], ...]]:
    """`note_lambda=0.25,0.5` or `rare_min_count:rare_max_count=5:25,10:50` -> (field, value) pairs per value."""
    keys, sep, values = text.partition("=")
    names = keys.split(":")
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    if not sep or not values or not all(names):
        raise ConfigError(f"--grid {text!r} is not FIELD=V1,V2 (or FIELD_A:FIELD_B=A1:B1,A2:B2); write it that way.")
    unknown = [n for n in names if n not in fields]
    if unknown:
        raise ConfigError(f"--grid {text!r} names {unknown[0]!r}, which is not a training flag; see train.py --help.")
    own = [n for n in names if n in SET_BY_THE_SWEEP]
    if own:
        raise ConfigError(
            f"--grid {text!r} sweeps {own[0]!r}, which the sweep sets itself (every setting is trained with TNF on "
            "against a baseline with it off, each run in its own folder under --out); sweep other fields."
        )
    points = []
    for value in values.split(","):
        parts = value.split(":")
        if len(parts) != len(names):
            raise ConfigError(
                f"--grid {text!r}: value {value!r} has {len(parts)} parts for {len(names)} fields; give one per field."
            )
        points.append(tuple(zip(names, parts)))
    return points


def grid(axes: list[str], preset: str, flags: list[str]) -> list[Setting]:
    """Every setting of the product of `axes`, each checked as train.py would check it."""
    given = [f.partition("=")[0] for f in flags if f.startswith("--") and f[2:].partition("=")[0] in SET_BY_THE_SWEEP]
    if given:
        raise ConfigError(
            f"{given[0]} is set by the sweep itself for every run it trains (TNF on against off, each run in its own "
            "folder under --out); leave it out."
        )
    parsed = [parse_axis(axis) for axis in axes]
    seen: dict[str, str] = {}
    for axis, points in zip(axes, parsed):
        for name, _ in points[0]:
            if name in seen:
                raise ConfigError(
                    f"--grid {seen[name]!r} and --grid {axis!r} both sweep {name!r}; give each field in one --grid."
                )
            seen[name] = axis
    settings = [Setting(tuple(pair for point in combo for pair in point)) for combo in itertools.product(*parsed)]
    for setting in settings:
        run_config(preset, flags, setting, "on")  # a bad value is refused before anything trains
    return settings


def run_config(preset: str, flags: list[str], setting: Setting, tnf: str) -> RunConfig:
    return parse_args(["--preset", preset, *flags, *setting.flags(), "--tnf", tnf])


def same_training(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in set(a) | set(b) if k not in RUN_ONLY)


def finished_run_of(cfg: RunConfig, candidates: list[Path]) -> Path | None:
    """The first candidate directory holding a finished run (its last step evaluated) trained exactly as `cfg` says."""
    wanted = dataclasses.asdict(cfg)
    for run in candidates:
        if not RunDir(run).run_config.is_file() or not RunDir(run).metrics.is_file():
            continue
        done = any(r["step"] == cfg.max_steps and "eval_loss_no_notes" in r for r in read_metrics(run))
        if done and same_training(RunDir(run).read_run_config(), wanted):
            return run
    return None


def cell(result: Comparison | None) -> str:
    """A yardstick's outcome in one cell: the loss gap at equal steps, and the step saving or 'never'."""
    if result is None:
        return "not logged"
    gap = "n/a" if result.loss_gap_at_equal_steps is None else f"{result.loss_gap_at_equal_steps:+.4f}"
    if result.tnf is None:
        return f"{gap}, never"
    return f"{gap}, saves {100 * result.step_saving:.0f}%" if result.step_saving is not None else f"{gap}, n/a"


def rare_exposure(records: list[dict]) -> float | None:
    """How often a noted rare word occurred during a TNF run, on average: notes written / words noted."""
    noted = [r["distinct_noted"] for r in records if "distinct_noted" in r]
    if not noted or not noted[-1]:
        return None
    return sum(r.get("notes_written", 0.0) for r in records) / noted[-1]


@dataclass(frozen=True)
class SweepRow:
    """One setting's outcome: its two runs, each yardstick's comparison and how often a noted rare word recurred."""

    setting: Setting
    baseline: Path
    tnf: Path
    results: list[Comparison]
    exposure: float | None


def compare_runs(setting: Setting, baseline: Path, tnf: Path) -> SweepRow:
    """Each run's metrics read once: the yardsticks' comparisons and the TNF run's rare-word exposure."""
    tnf_records = read_metrics(tnf)
    return SweepRow(
        setting, baseline, tnf, compare_all(read_metrics(baseline), tnf_records), rare_exposure(tnf_records)
    )


def table(rows: list[SweepRow]) -> str:
    """One row per setting: how often a rare word recurred, then for each yardstick TNF - baseline at the last common
    evaluation and the step saving."""
    lines = [
        "| setting | baseline | rare word seen (mean times) | " + " | ".join(y.name for y in YARDSTICKS) + " |",
        "| --- | --- | --- |" + " --- |" * len(YARDSTICKS),
    ]
    for row in rows:
        by_id = {r.yardstick.id: r for r in row.results}
        seen = "n/a" if row.exposure is None else f"{row.exposure:.1f}"
        lines.append(
            f"| {row.setting.name} | `{row.baseline}` | {seen} | "
            + " | ".join(cell(by_id.get(y.id)) for y in YARDSTICKS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def summary_json(rows: list[SweepRow]) -> list[dict]:
    return [
        {
            "setting": dict(row.setting.values),
            "baseline": str(row.baseline),
            "tnf": str(row.tnf),
            "rare_exposure": row.exposure,
            "yardsticks": [r.as_json() for r in row.results],
        }
        for row in rows
    ]
