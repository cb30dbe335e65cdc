"""Where notes pay: the baseline once, TNF over a grid of settings, one table of the time-to-loss yardsticks.

    python tools/tnf_sweep.py --out runs/sweep --preset bench --grid note_lambda=0.25,0.5 \
        --grid notes_at_masked=false,true
    python tools/tnf_sweep.py --out runs/sweep --grid rare_min_count:rare_max_count=5:25,10:50 --max_steps 1200
    ... --reuse runs/bench/baseline runs/bench/tnf   # finished runs trained as a setting needs: not trained again

Each --grid axis is FIELD=V1,V2 over train.py's flags (FIELD_A:FIELD_B=A1:B1,A2:B2 for fields that go
together); the settings are their product. The baseline (--tnf off) trains once per value of the axes
it depends on (everything but note_lambda, note_gamma, note_window and notes_at_masked). Extra flags go
to every run. Writes OUT/sweep.md and OUT/sweep.json (one row per setting: how many times a noted rare
word occurred during the TNF run on average, then TNF - baseline at equal steps and the step saving,
on each yardstick) and each setting's full time-to-loss report in OUT/report-TAG/.
"""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

from tnf_scale.config import RunConfig, forwarding_parser
from tnf_scale.errors import command_line
from tnf_scale.reports.bench import add_overwrite_flag, check_replaceable, finished_run, launch_training
from tnf_scale.reports.sweep import Setting, compare_runs, finished_run_of, grid, run_config, summary_json, table
from tnf_scale.reports.time_to_loss import write_report
from tnf_scale.run_dir import RunDir, check_out_dir


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "every run of the sweep")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="bench")
    parser.add_argument(
        "--grid", action="append", required=True, metavar="FIELD=V1,V2", help="one axis of the grid (repeat for more)"
    )
    parser.add_argument(
        "--reuse", nargs="+", default=[], metavar="RUN", help="finished runs to use where their configuration fits"
    )
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--master_port", type=int, default=29699)
    add_overwrite_flag(parser)
    args, flags = parser.parse_known_args(argv)
    out = check_out_dir(args.out, "--out")

    def target(setting: Setting, tnf: str) -> Path:
        return out / f"{'baseline' if tnf == 'off' else 'tnf'}-{setting.tag}"

    settings = grid(args.grid, args.preset, flags)  # every setting is checked before the first run starts
    command = shlex.join(["python", "tools/tnf_sweep.py", *(argv if argv is not None else sys.argv[1:])])

    for reused in args.reuse:
        finished_run(reused, "--reuse")
    plan = {}  # (setting, --tnf) -> the finished run to reuse, or None: train it
    for setting in settings:
        for trained, tnf in ((setting.shared(), "off"), (setting, "on")):
            cfg: RunConfig = run_config(args.preset, flags, trained, tnf)
            plan[trained, tnf] = finished_run_of(cfg, [target(trained, tnf), *map(Path, args.reuse)])
    check_replaceable([target(s, tnf) for (s, tnf), found in plan.items() if found is None], args.overwrite)

    def obtain(setting: Setting, tnf: str) -> Path:
        found = plan[setting, tnf]
        if found:
            print(f"reusing {found} for {setting.name} (--tnf {tnf})", flush=True)
            return found
        plan[setting, tnf] = launch_training(  # trained once, then reused by the settings sharing it
            target(setting, tnf),
            args.ranks,
            args.master_port,
            ["--preset", args.preset, *flags, *setting.flags(), "--tnf", tnf],
            args.overwrite,
        )
        return plan[setting, tnf]

    rows = []
    for setting in settings:
        baseline = obtain(setting.shared(), "off")
        tnf = obtain(setting, "on")
        write_report(baseline, tnf, out / f"report-{setting.tag}")
        rows.append(compare_runs(setting, baseline, tnf))
        origins = [RunDir(run).read_provenance() for row in rows for run in (row.baseline, row.tnf)]
        commits, machines = (sorted({o.get(key, "unknown") for o in origins}) for key in ("commit", "machine"))
        text = "\n".join(
            [
                f"# TNF sweep: preset {args.preset}, {len(rows)} of {len(settings)} settings",
                "",
                f"`{command}` on {datetime.date.today()}; runs trained at commit {', '.join(commits)} on "
                f"{'; '.join(machines)}.",
                "",
                "Each cell: TNF - baseline held-out loss at the last common evaluation (negative: TNF lower), "
                "then the share of "
                "the baseline's steps TNF saved to reach the baseline's final value, or 'never'. Full reports "
                "in report-TAG/.",
                "",
                table(rows),
            ]
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.md").write_text(text)  # rewritten after every setting: a partial sweep is readable
        (out / "sweep.json").write_text(
            json.dumps({"command": command, "preset": args.preset, "rows": summary_json(rows)}, indent=2) + "\n"
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
