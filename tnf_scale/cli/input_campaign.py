"""Bad-input campaign: run every case of tnf_scale/reports/input_campaign.py and say how each ended.

    python tools/input_campaign.py --out tools/results/input_campaign [--work /tmp/campaign]

Each case is one command given one mistake; it is judged on whether it hung, whether a run directory it pointed at
changed, and whether it was refused in one sentence with exit status 2. Writes input_campaign.md and .json into
--out and prints a line per case. --work keeps the campaign's corpus, data cache and trained run between campaigns.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tnf_scale.errors import CommandParser
from tnf_scale.reports.input_campaign import run_campaign, summary, write_report
from tnf_scale.run_dir import commit


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where input_campaign.md and .json go")
    parser.add_argument("--work", help="the campaign's working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="input_campaign-"))
    work.mkdir(parents=True, exist_ok=True)
    outcomes = run_campaign(work.resolve())
    print(f"report: {write_report(outcomes, Path(args.out), commit())}")
    total = summary(outcomes)["total"]
    print(
        f"{total['one_sentence']}/{total['cases']} one-sentence refusals, {total['hangs']} hangs, "
        f"{total['data_changed']} with a watched run changed"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
