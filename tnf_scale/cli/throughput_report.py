"""Throughput report: tokens/s and samples/s, the step split into phases, model FLOPs, MFU, GPU state.

    python tools/throughput_report.py --run runs/demo                                   # a finished run
    python tools/throughput_report.py --run runs/bench/baseline runs/bench/tnf \
        --peer runs/bench/hf_trainer --out runs/bench
    python tools/throughput_report.py --preset tiny --steps 30 --with_peer --out runs/tp   # train first
    python tools/throughput_report.py --preset bert-base --steps 6 --compile_ab --out runs/tp_compile
    (extra flags go to train.py)

Prints a table and writes throughput.md, throughput.json and throughput.png into --out (default: the first run).
--peer names a run of tnf_scale/reports/hf_peer.py (the same model, data, batch and optimizer through the
Hugging Face Trainer); the table then gives each run's tokens/s as a multiple of the peer's. With --preset the
tool trains --trials rounds, each trainer once per round, in turn A B, then B A, ... (this machine's speed
drifts; a trainer always first would take the drift), at the preset's global batch but at least 64 sequences
per step (by accumulation) unless --global_batch_size says otherwise. MFU is against the GPU's dense peak in the
run's math (looked up by its NVML name) or, on a CPU, against a matmul peak of this machine measured in the same
invocation and named as such.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.config import forwarding_parser, resolve
from tnf_scale.errors import ConfigError, command_line
from tnf_scale.launch import PEER_SCRIPT, TRAIN_SCRIPT
from tnf_scale.reports.bench import add_overwrite_flag, check_replaceable, launch_training, timing_flags, trial_plan
from tnf_scale.reports.throughput import check_warmup, write_report
from tnf_scale.run_dir import check_out_dir

MIN_SEQUENCES_PER_STEP = 64


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "the timed runs")
    parser.add_argument("--run", nargs="+", help="finished runs' output_dirs")
    parser.add_argument("--peer", help="a finished tnf_scale/reports/hf_peer.py run to compare with")
    parser.add_argument("--preset", help="train this preset first (with --steps, --out)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--trials", type=int, default=2, help="with --preset: rounds of training every trainer, in alternating order"
    )
    parser.add_argument(
        "--with_peer", action="store_true", help="with --preset: also run the Hugging Face Trainer peer"
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "bf16"),
        help="with --preset: one tnf_scale run per precision, side by side (the peer runs in the last one)",
    )
    parser.add_argument(
        "--compile_ab",
        action="store_true",
        help="with --preset: each tnf_scale run twice, eager and with its encoder layers compiled (--compile), "
        "side by side (the peer runs eager)",
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
        name
        for name, given in (
            ("--precisions", args.precisions),
            ("--with_peer", args.with_peer),
            ("--compile_ab", args.compile_ab),
        )
        if given
    ]
    if args.run and trains_only:
        raise ConfigError(
            f"{trains_only[0]} applies to the runs this tool trains with --preset; the --run runs are trained "
            "already: leave it out, or give --preset instead of --run."
        )
    check_warmup(args.warmup)  # before anything is trained
    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: give the number of rounds to train every trainer (1 or more).")
    if args.preset:
        out = check_out_dir(args.out, "--out")
        flags = [*timing_flags(args.preset, args.steps), *realistic_batch(args.preset, extra), *extra]
        arms = timed_arms(args.precisions, args.compile_ab, args.with_peer)
        plan = trial_plan(list(arms), args.trials)
        check_replaceable([trial_dir(out, name, t) for t, name in plan], args.overwrite)
        for t, name in plan:
            script = PEER_SCRIPT if name == "hf_trainer" else TRAIN_SCRIPT
            launch_training(
                trial_dir(out, name, t), args.ranks, args.master_port, [*flags, *arms[name]], args.overwrite, script
            )
        trials = {name: [trial_dir(out, name, t) for t in range(args.trials)] for name in arms}
        peer = trials.pop("hf_trainer", None)
        runs = list(trials.values())
    else:
        runs, peer = [[Path(r)] for r in args.run], [Path(args.peer)] if args.peer else None
        out = check_out_dir(args.out or runs[0][0], "--out")
    print(write_report(runs, peer, out, args.warmup))
    return 0


def timed_arms(precisions: list[str] | None, compile_ab: bool, with_peer: bool) -> dict[str, list[str]]:
    """The runs of one trial, by name, with the flags each adds: one tnf_scale run per precision (or one run), each
    eager and compiled with `compile_ab`, and the peer in the last precision, eager (it has no --compile)."""
    base = {f"run_{p}": ["--precision", p] for p in precisions} if precisions else {"run": []}
    arms = base
    if compile_ab:
        modes = (("eager", "false"), ("compiled", "true"))
        arms = {f"{name}_{mode}": [*flags, "--compile", on] for name, flags in base.items() for mode, on in modes}
    if with_peer:
        arms["hf_trainer"] = list(base.values())[-1]
    return arms


def trial_dir(out: Path, arm: str, trial: int) -> Path:
    return out / f"trial{trial + 1}" / arm


def realistic_batch(preset: str, extra: list[str]) -> list[str]:
    """`--global_batch_size` of a timing run: the preset's, at least MIN_SEQUENCES_PER_STEP, unless the forwarded
    flags give one (at a few sequences per step the fixed work of a step weighs more than in pre-training)."""
    if any(flag.split("=")[0] == "--global_batch_size" for flag in extra):
        return []
    return ["--global_batch_size", str(max(resolve(preset, {}).global_batch_size, MIN_SEQUENCES_PER_STEP))]


if __name__ == "__main__":
    sys.exit(main())
