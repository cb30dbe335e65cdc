"""Time-to-loss report: how much sooner TNF reaches the baseline's held-out loss, in steps and in wall time.

    python tools/time_to_loss.py --baseline runs/plain --tnf runs/tnf --out runs/ttl       # two finished runs
    python tools/time_to_loss.py --preset bench --out runs/ttl [train.py flags]             # train both first

The second form trains the baseline (--tnf off) and then TNF with the same preset, seed, data and
global batch into OUT/baseline and OUT/tnf. Either way it writes time_to_loss.md, time_to_loss.json
and time_to_loss.png into --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.config import forwarding_parser
from tnf_scale.errors import command_line
from tnf_scale.reports.bench import add_overwrite_flag, launch_pair
from tnf_scale.reports.time_to_loss import check_options, write_report
from tnf_scale.run_dir import check_out_dir


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "the baseline and TNF runs it trains")
    parser.add_argument("--baseline", help="output_dir of a finished --tnf off run")
    parser.add_argument("--tnf", help="output_dir of a finished TNF run")
    parser.add_argument("--preset", help="train the baseline and TNF with this preset first")
    parser.add_argument("--out", required=True)
    parser.add_argument("--target", type=float, help="held-out loss to reach (default: the baseline's final, smoothed)")
    parser.add_argument("--window", type=int, default=3, help="evaluations in the trailing mean")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--master_port", type=int, default=29695)
    add_overwrite_flag(parser)
    args, train_flags = parser.parse_known_args(argv)
    if args.preset is None and (args.baseline is None or args.tnf is None or train_flags):
        parser.error("give --baseline and --tnf (finished runs), or --preset P and train.py flags to train both")
    out = check_out_dir(args.out, "--out")
    check_options(args.target, args.window)  # before anything is trained
    if args.preset:
        baseline, tnf = launch_pair(
            out, args.ranks, args.master_port, ["--preset", args.preset, *train_flags], args.overwrite
        )
    else:
        baseline, tnf = Path(args.baseline), Path(args.tnf)
    print(write_report(baseline, tnf, out, args.target, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
