"""TNF against the baseline on this machine: time to loss and throughput, side by side, in one folder.

    python tools/bench_tnf.py --out runs/bench                  # `make bench`: the bench preset, bundled corpus
    python tools/bench_tnf.py --out runs/mine --preset bert-base --ranks 8 --corpus /data/wiki --max_steps 20000
    python tools/bench_tnf.py --out runs/bench_electra --objective electra  # ELECTRA on the bench shape

Trains the baseline (--tnf off) and then TNF with the same preset, seed, data and global batch
(OUT/baseline, OUT/tnf), each checkpointed at --downstream_points even fractions of the run, then
--peer_steps steps of the same model, data, batch and optimizer through the Hugging Face Trainer
(OUT/hf_trainer; BERT's masked LM only, so ELECTRA benches have no peer). Every checkpoint of both
runs is then exported and fine-tuned on the shipped task with the same --downstream_seeds (time to score,
tnf_scale/reports/downstream.py). Writes time_to_loss.{md,json,png}, downstream.{md,json,png},
throughput.{md,json} and report.md (all three, with the machine and the command) into OUT. Extra flags go to
every run. --reports_only makes the reports again from the runs in OUT (reusing fine-tuning results already there).
"""

from __future__ import annotations

import datetime
import shlex
import sys

from tnf_scale.config import forwarding_parser, parse_args
from tnf_scale.errors import ConfigError, command_line
from tnf_scale.finetune.run import FinetuneArgs
from tnf_scale.finetune.shipped import build as build_shipped_task
from tnf_scale.launch import PEER_SCRIPT
from tnf_scale.reports.bench import add_overwrite_flag, check_replaceable, launch_pair, launch_training, pair_dirs
from tnf_scale.reports.downstream import write_report as write_downstream
from tnf_scale.reports.throughput import write_report as write_throughput
from tnf_scale.reports.time_to_loss import check_runs
from tnf_scale.reports.time_to_loss import write_report as write_time_to_loss
from tnf_scale.run_dir import RunDir, check_out_dir


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "the baseline and TNF runs")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument(
        "--peer_steps", type=int, default=200, help="steps of the Hugging Face Trainer peer (throughput only)"
    )
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the throughput timing")
    parser.add_argument("--master_port", type=int, default=29697)
    add_overwrite_flag(parser)
    parser.add_argument(
        "--reports_only", action="store_true", help="make the reports again from the runs already in --out"
    )
    parser.add_argument(
        "--downstream_points",
        type=int,
        default=4,
        help="checkpoints per run fine-tuned for time to score (25, 50, 75, 100%%)",
    )
    parser.add_argument(
        "--downstream_seeds", type=int, nargs="+", default=[1, 2, 3], help="fine-tuning seeds (fewer: a quicker look)"
    )
    parser.add_argument(
        "--downstream_examples", type=int, default=2000, help="training examples of the shipped task per fine-tuning"
    )
    parser.add_argument("--downstream_eval_examples", type=int, help="validation examples scored (default: all)")
    parser.add_argument("--downstream_epochs", type=float, default=2.0)
    parser.add_argument(
        "--downstream_lr", type=float, default=1e-3, help="the tiny CPU models want more than BERT's 2e-5"
    )
    parser.add_argument("--downstream_cache", default=".cache/tnf_data", help="where the set-up put the shipped task")
    args, train_flags = parser.parse_known_args(argv)
    out = check_out_dir(args.out, "--out")
    if args.downstream_points < 1:
        raise ConfigError("--downstream_points must be at least 1 (the end of each run).")
    run_cfg = parse_args(["--preset", args.preset, *train_flags])
    flags = [
        "--preset",
        args.preset,
        *train_flags,
        "--save_interval",
        str(max(1, run_cfg.max_steps // args.downstream_points)),
        "--keep_checkpoints",
        "0",  # every one: the time-to-score report fine-tunes each
    ]
    with_peer = run_cfg.objective == "mlm"  # the Hugging Face Trainer peer trains BERT's masked LM
    if args.reports_only:
        baseline, tnf, peer = out / "baseline", out / "tnf", out / "hf_trainer" if with_peer else None
    else:
        check_replaceable([*pair_dirs(out), out / "hf_trainer"], args.overwrite)
        baseline, tnf = launch_pair(out, args.ranks, args.master_port, flags, args.overwrite)
        peer = (
            launch_training(
                out / "hf_trainer",
                args.ranks,
                args.master_port,
                [*flags, "--max_steps", str(args.peer_steps)],
                args.overwrite,
                PEER_SCRIPT,
            )
            if with_peer
            else None
        )
    command = shlex.join(["python", "tools/bench_tnf.py", *(argv if argv is not None else sys.argv[1:])])
    check_runs(baseline, tnf)  # before anything is fine-tuned
    settings = FinetuneArgs(
        "",
        "",
        args.downstream_seeds,
        args.downstream_lr,
        args.downstream_epochs,
        max_seq_len=128,
        max_train_examples=args.downstream_examples,
        max_eval_examples=args.downstream_eval_examples,
    )
    build_shipped_task(args.downstream_cache)
    downstream, downstream_verdict = write_downstream(baseline, tnf, out, args.downstream_cache, settings)
    time_to_loss = write_time_to_loss(baseline, tnf, out, downstream=downstream_verdict)
    run, origin = RunDir(baseline).read_run_config(), RunDir(baseline).read_provenance()
    report = "\n".join(
        [
            f"# TNF vs baseline: preset {run['preset']}, objective {run.get('objective', 'mlm')}, "
            f"{run['max_steps']} steps of "
            f"{run['global_batch_size']} x {run['max_seq_len']} tokens",
            "",
            f"Trained at commit {origin.get('commit', 'unknown')} on {origin.get('machine', 'an unrecorded machine')} "
            f"({origin.get('world_size', '?')} rank(s), started {origin.get('started', '?')}); "
            f"reports by `{command}` on {datetime.date.today()}.",
            "",
            "## Time to loss",
            "",
            time_to_loss,
            "## Time to score (downstream)",
            "",
            downstream,
            "## Throughput",
            "",
            write_throughput([[baseline], [tnf]], [peer] if peer else None, out, args.warmup),
        ]
    )
    (out / "report.md").write_text(report)
    print(report)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
