"""Fault campaign: interrupt a 2-rank TNF run with random faults, resume it, and compare it with an uninterrupted run.

    python tools/fault_campaign.py --trials 20 --out runs/faults

Trains the reference once, then for each trial starts the same run, sends one fault (a random signal to a random
rank at a random step, SIGKILL during a checkpoint write, or a signal to the launcher; see
tnf_scale/reports/faults.py), checks that no rank is left running, resumes the run to its end, and compares every
step's loss and the final note dictionary with the reference. Writes fault_campaign.md and .json into --out and
prints the table and a total such as "20/20 identical within 1e-05, 0 notes lost, 0 orphaned ranks".
Flags it does not know go to train.py (e.g. --corpus, --data_cache).
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path

from tnf_scale.config import HOW_RUN, config_conflict, forwarding_parser, parse_args
from tnf_scale.errors import ConfigError, exit_code
from tnf_scale.reports.bench import finished_run
from tnf_scale.reports.faults import FAULTS, run_to_end, run_trial, write_report
from tnf_scale.run_dir import RunDir, check_out_dir


def campaign(argv: list[str] | None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "every run of the campaign")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help="comma-separated faults to draw from (random order); with --in_order they are taken in turn",
    )
    parser.add_argument(
        "--in_order", action="store_true", help="trial i takes fault i (cycling) instead of a random one"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=24)
    parser.add_argument("--save_interval", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws (not of training)")
    parser.add_argument("--master_port", type=int, default=29671)
    parser.add_argument("--out", default="runs/faults")
    parser.add_argument(
        "--reference",
        help="an uninterrupted finished run with the same training flags (any number of ranks, any "
        "--save_interval) to compare with, instead of training one",
    )
    args, extra = parser.parse_known_args(argv)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in faults if f not in FAULTS]
    if unknown or not faults:
        raise ConfigError(
            f"unknown fault {unknown[0] if unknown else '(none given)'!r} in --faults; choose from {', '.join(FAULTS)}."
        )
    if args.trials < 1 or args.max_steps < 4 or not 1 <= args.save_interval < args.max_steps:
        raise ConfigError(
            "--trials must be at least 1, --max_steps at least 4, and --save_interval between 1 and --max_steps - 1."
        )
    out = check_out_dir(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    flags = [
        "--preset",
        "tiny",
        "--max_steps",
        str(args.max_steps),
        "--save_interval",
        str(args.save_interval),
        "--eval_interval",
        str(args.max_steps),
        "--dropout",
        "0",
        *extra,
    ]
    reference = Path(args.reference) if args.reference else out / "reference"
    if args.reference:
        finished_run(reference, "--reference")
        wanted = dataclasses.asdict(parse_args(flags))
        trained = RunDir(reference).read_run_config() if RunDir(reference).run_config.is_file() else wanted
        name = config_conflict(trained, wanted, HOW_RUN)
        if name is not None:
            raise ConfigError(
                f"--reference {reference} was trained with --{name} {trained.get(name)}, the campaign trains with "
                f"--{name} {wanted.get(name)}; give a reference trained with the campaign's flags (or none)."
            )
    elif run_to_end(reference, args.ranks, args.master_port, flags, resume=False, log=out / "reference.log") != 0:
        raise ConfigError(f"the uninterrupted reference run failed; see {out / 'reference.log'}.")
    rng = random.Random(args.seed)
    trials = []
    for number in range(1, args.trials + 1):
        fault = faults[(number - 1) % len(faults)] if args.in_order else rng.choice(faults)
        trial = run_trial(number, fault, out, reference, args.ranks, args.master_port, flags, args.max_steps, rng)
        print(
            f"trial {number}: {fault} -> {trial.target} after step {trial.at_step}: "
            f"{'identical' if trial.identical else 'DIFFERS'}",
            flush=True,
        )
        trials.append(trial)
    command = "python tools/fault_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(out, trials, command))
    return 0 if all(t.identical for t in trials) else 1


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: campaign(argv))


if __name__ == "__main__":
    sys.exit(main())
