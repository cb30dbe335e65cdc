"""python -m tnf_scale.node_check [--out DIR] [--dry_run]: the GPU check (tools/gpu_check.sh starts it)."""

from __future__ import annotations

import os
import random
import socket
import sys
import time
from pathlib import Path

import torch

from tnf_scale.errors import CommandParser, command_line
from tnf_scale.node_check.plan import plan
from tnf_scale.node_check.runner import Check
from tnf_scale.run_dir import check_out_dir, commit, machine

START_BY, END_BY = 7 * 60, 9 * 60  # seconds from the call's start (GPU_CHECK_STARTED, set by tools/gpu_check.sh)


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="tools/gpu_check.sh", description="The GPU check: what this node gives tnf_scale, in one report."
    )
    parser.add_argument("--out", default="runs/gpu_check", help="where the report and the runs go")
    parser.add_argument("--dry_run", action="store_true", help="every step at its smallest size, on any machine")
    args = parser.parse_args(argv)
    out = check_out_dir(args.out, "--out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = float(os.environ.get("GPU_CHECK_STARTED") or time.time())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    header = [
        f"# GPU check: {socket.gethostname()}, {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime(started))}",
        "",
        *(
            ["**Dry run**: every step at its smallest size; no figure below describes a GPU.", ""]
            if args.dry_run
            else []
        ),
        f"Commit {commit()}; GPUs visible to torch: {gpus}; machine: {machine()}. No step starts "
        f"after minute {START_BY // 60}, none runs past minute {END_BY // 60}; each has its own timeout.",
    ]
    check = Check(out, header, started, started + START_BY, started + END_BY)
    bin_dir = Path(sys.executable).parent
    jobs, steps = plan(out, args.dry_run, gpus, sys.executable, bin_dir, 29800 + random.randrange(100))
    for job in jobs:
        check.start(job)
    for step in steps:
        outcome = check.run(step)
        print(f"== {step.title}: {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
    status = check.finish()
    print(f"report: {check.report_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
