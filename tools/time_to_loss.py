"""Time-to-loss report: how much sooner TNF reaches the baseline's held-out loss, in steps and in wall time.

    python tools/time_to_loss.py --baseline runs/plain --tnf runs/tnf --out runs/ttl_report

Reads both runs' metrics.jsonl and writes report.md, report.json and time_to_loss.png into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnf_scale.metrics import read_metrics  # noqa: E402
from tnf_scale.time_to_loss import compare, markdown, plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="output_dir of the --tnf off run")
    parser.add_argument("--tnf", required=True, help="output_dir of the TNF run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, help="held-out loss to reach (default: the baseline's final, smoothed)")
    parser.add_argument("--window", type=int, default=3, help="evaluations in the trailing mean")
    args = parser.parse_args(argv)
    baseline, tnf = read_metrics(args.baseline), read_metrics(args.tnf)
    result = compare(baseline, tnf, args.target, args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown(result, args.baseline, args.tnf)
    (out / "report.md").write_text(report + "\n![time to loss](time_to_loss.png)\n")
    (out / "report.json").write_text(json.dumps({**dataclasses.asdict(result), "step_saving": result.step_saving,
                                                 "time_saving": result.time_saving, "verdict": result.verdict()}, indent=2) + "\n")
    plot(baseline, tnf, result, out / "time_to_loss.png")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
