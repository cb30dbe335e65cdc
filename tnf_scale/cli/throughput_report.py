"""Throughput report: tokens/s and samples/s, the step split into phases, model FLOPs, MFU, GPU state.

    python tools/throughput_report.py --run runs/demo                                   # a finished run
    python tools/throughput_report.py --run runs/bench/baseline runs/bench/tnf \
        --peer runs/bench/hf_trainer --out runs/bench
    python tools/throughput_report.py --preset tiny --steps 30 --with_peer --out runs/tp   # train first
    (extra flags go to train.py)

Prints a table and writes throughput.md and throughput.json into --out (default: the first run).
--peer names a run of tnf_scale/reports/hf_peer.py (the same model, data, batch and optimizer through the
Hugging Face Trainer); the table then gives each run's tokens/s as a multiple of the peer's. MFU is
against the GPU's dense bf16 peak (looked up by its NVML name) or, on a CPU, against a matmul peak
of this machine measured in the same invocation and named as such.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.config import forwarding_parser
from tnf_scale.errors import ConfigError, command_line
from tnf_scale.launch import PEER_SCRIPT
from tnf_scale.reports.bench import add_overwrite_flag, check_replaceable, launch_training, timing_flags
from tnf_scale.reports.throughput import check_warmup, write_report
from tnf_scale.run_dir import check_out_dir


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "the timed runs")
    parser.add_argument("--run", nargs="+", help="finished runs' output_dirs")
    parser.add_argument("--peer", help="a finished tnf_scale/reports/hf_peer.py run to compare with")
    parser.add_argument("--preset", help="train this preset first (with --steps, --out)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--with_peer", action="store_true", help="with --preset: also run the Hugging Face Trainer peer"
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "bf16"),
        help="with --preset: one tnf_scale run per precision, side by side (the peer runs in the last one)",
    )
    parser.add_argument("--out", help="where the report goes (default: the first --run)")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--master_port", type=int, default=29691)
    add_overwrite_flag(parser)
    args, extra = parser.parse_known_args(argv)
    if (args.run is None) == (args.preset is None) or (args.preset and not args.out) or (args.run and extra):
        parser.error("give --run RUN_DIR [...] (and --peer), or --preset P with --steps and --out (and train.py flags)")
    trains_only = [
        name for name, given in (("--precisions", args.precisions), ("--with_peer", args.with_peer)) if given
    ]
    if args.run and trains_only:
        raise ConfigError(
            f"{trains_only[0]} applies to the runs this tool trains with --preset; the --run runs are trained "
            "already: leave it out, or give --preset instead of --run."
        )
    check_warmup(args.warmup)  # before anything is trained
    if args.preset:
        out = check_out_dir(args.out, "--out")
        flags = [*timing_flags(args.preset, args.steps), *extra]
        precisions = {f"run_{p}": ["--precision", p] for p in args.precisions} if args.precisions else {"run": []}
        check_replaceable([out / name for name in precisions] + [out / "hf_trainer"] * args.with_peer, args.overwrite)
        runs = [
            launch_training(out / name, args.ranks, args.master_port, [*flags, *p], args.overwrite)
            for name, p in precisions.items()
        ]
        last = list(precisions.values())[-1]
        peer = (
            launch_training(
                out / "hf_trainer", args.ranks, args.master_port, [*flags, *last], args.overwrite, PEER_SCRIPT
            )
            if args.with_peer
            else None
        )
    else:
        runs, peer = [Path(r) for r in args.run], Path(args.peer) if args.peer else None
        out = check_out_dir(args.out or runs[0], "--out")
    print(write_report(runs, peer, out, args.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
