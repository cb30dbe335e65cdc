"""TNF against the baseline on this machine: time to loss and throughput, side by side, in one folder.

    python tools/bench_tnf.py --out runs/bench                  # `make bench`: the bench preset, bundled corpus
    python tools/bench_tnf.py --out runs/mine --preset bert-base --ranks 8 --corpus /data/wiki --max_steps 20000

Trains the baseline (--tnf off) and then TNF with the same preset, seed, data and global batch
(OUT/baseline, OUT/tnf), then --peer_steps steps of the same model, data, batch and optimizer
through the Hugging Face Trainer (OUT/hf_trainer). Writes time_to_loss.{md,json,png},
throughput.{md,json} and report.md (both, with the machine and the command) into OUT.
Extra flags go to every run. --reports_only makes the reports again from the runs in OUT.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnf_scale.reports.bench import PEER_SCRIPT, launch_pair, launch_training  # noqa: E402
from tnf_scale.config import exit_code  # noqa: E402
from tnf_scale.run_dir import RunDir  # noqa: E402
from tnf_scale.reports.throughput import write_report as write_throughput  # noqa: E402
from tnf_scale.reports.time_to_loss import write_report as write_time_to_loss  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--preset", default="bench")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--peer_steps", type=int, default=200, help="steps of the Hugging Face Trainer peer (throughput only)")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the throughput timing")
    parser.add_argument("--master_port", type=int, default=29697)
    parser.add_argument("--reports_only", action="store_true", help="make the reports again from the runs already in --out")
    args, train_flags = parser.parse_known_args(argv)
    out = Path(args.out)
    flags = ["--preset", args.preset, *train_flags]
    if args.reports_only:
        baseline, tnf, peer = out / "baseline", out / "tnf", out / "hf_trainer"
    else:
        baseline, tnf = launch_pair(out, args.ranks, args.master_port, flags)
        peer = launch_training(out / "hf_trainer", args.ranks, args.master_port, [*flags, "--max_steps", str(args.peer_steps)], PEER_SCRIPT)
    command = shlex.join(["python", "tools/bench_tnf.py", *(argv if argv is not None else sys.argv[1:])])
    time_to_loss = write_time_to_loss(baseline, tnf, out)  # checks the runs are there before anything else is read
    run, origin = RunDir(baseline).read_run_config(), RunDir(baseline).read_provenance()
    report = "\n".join([
        f"# TNF vs baseline: preset {run['preset']}, {run['max_steps']} steps of {run['global_batch_size']} x {run['max_seq_len']} tokens", "",
        f"Trained at commit {origin.get('commit', 'unknown')} on {origin.get('machine', 'an unrecorded machine')} "
        f"({origin.get('world_size', '?')} rank(s), started {origin.get('started', '?')}); "
        f"reports by `{command}` on {datetime.date.today()}.", "",
        "## Time to loss", "", time_to_loss,
        "## Throughput", "", write_throughput([baseline, tnf], peer, out, args.warmup),
    ])
    (out / "report.md").write_text(report)
    print(report)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
