"""A resumed run against the uninterrupted one, beside the noise floor: a second uninterrupted run of the same seed
against the first. Usage: python -m tnf_scale.node_check.compare OUT.md REFERENCE SECOND RESUMED FROM_STEP"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.metrics import read_metrics

CPU_BOUND = 1e-5  # what the suite holds a resume to on a CPU, where the floor is zero


def losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run)) if "loss" in r}


def largest_gap(a: dict[int, float], b: dict[int, float], after: int) -> float:
    """The largest relative loss difference at the steps after `after` both runs logged."""
    steps = [s for s in a if s > after and s in b]
    if not steps:
        raise SystemExit(f"no step after {after} logged by both runs")
    return max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)


def main(out: Path, reference: str, second: str, resumed: str, from_step: int) -> int:
    first = losses(reference)
    floor, gap = largest_gap(first, losses(second), from_step), largest_gap(first, losses(resumed), from_step)
    bound = max(2 * floor, CPU_BOUND)
    lines = [
        f"- noise floor (a second uninterrupted run against the first): largest relative loss difference {floor:.3g}",
        f"- resumed at step {from_step} against the uninterrupted run: {gap:.3g}",
        f"- within max(2 x floor, {CPU_BOUND:g}) = {bound:.3g}: {'yes' if gap <= bound else 'NO'}",
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if gap <= bound else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), *sys.argv[2:5], int(sys.argv[5])))
