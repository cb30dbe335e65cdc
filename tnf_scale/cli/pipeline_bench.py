"""Pipeline vs data parallelism on this machine: tokens/s of the tiny preset with 2 stages x 1 vs 2 data-parallel ranks.

    python tools/pipeline_bench.py --steps 30 --out runs/pipeline_bench

Also prints the pipeline bubble fraction DeepSpeed's 1F1B schedule implies: with P stages and
M micro-batches per step, (P - 1) / (M + P - 1) of each stage's time is idle.
"""

from __future__ import annotations

import json
import sys

from tnf_scale.errors import CommandParser, command_line
from tnf_scale.reports.bench import (
    add_overwrite_flag,
    check_replaceable,
    launch_training,
    median_of,
    steady_steps,
    timing_flags,
)
from tnf_scale.run_dir import check_out_dir


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (P - 1) / (M + P - 1)."""
    return (stages - 1) / (micro_batches + stages - 1)


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--global_batch_size", type=int, default=32)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--out", default="runs/pipeline_bench")
    parser.add_argument("--master_port", type=int, default=29675)
    add_overwrite_flag(parser)
    args = parser.parse_args(argv)
    out = check_out_dir(args.out, "--out")
    flags = [
        *timing_flags("tiny", args.steps),
        *("--global_batch_size", str(args.global_batch_size), "--micro_batch_size", str(args.micro_batch_size)),
    ]
    layouts = {"pipeline 2 x data 1": "ds_configs/tiny_pp2.json", "data 2": "ds_configs/zero1.json"}
    check_replaceable([out / name.replace(" ", "_") for name in layouts], args.overwrite)
    rows = []
    for i, (name, ds_config) in enumerate(layouts.items()):
        run = launch_training(
            out / name.replace(" ", "_"),
            2,
            args.master_port + i,
            [*flags, "--deepspeed_config", ds_config],
            args.overwrite,
        )
        steps = steady_steps(run, args.warmup)
        rows.append(
            {
                "layout": name,
                "tokens_per_s": median_of(steps, "tokens_per_s"),
                "step_seconds": median_of(steps, "step_seconds"),
            }
        )
    micro = args.global_batch_size // args.micro_batch_size  # per step, for the single data-parallel pipeline
    report = {
        "rows": rows,
        "micro_batches_per_step": micro,
        "bubble_fraction": bubble_fraction(2, micro),
        "command": " ".join(["python", "tools/pipeline_bench.py", *(argv or sys.argv[1:])]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"`{report['command']}` (tiny preset, 2 CPU ranks, global batch {args.global_batch_size}, micro-batch "
        f"{args.micro_batch_size}, "
        f"median over steps after {args.warmup}):",
        "",
        "| layout | tokens/s | step |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r['layout']} | {r['tokens_per_s']:,.0f} | {1000 * r['step_seconds']:.0f} ms |" for r in rows]
    lines += [
        "",
        f"1F1B bubble with 2 stages and {micro} micro-batches per step: {100 * report['bubble_fraction']:.1f}% "
        f"of each stage's time.",
    ]
    (out / "pipeline_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
