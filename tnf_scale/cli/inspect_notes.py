"""What a run's notes learned: nearest vocabulary tokens to a sample of rare words' notes and to their own embeddings,
note norms and movement, and the share of rare occurrences that read a note per step.

    python tools/inspect_notes.py runs/bench/tnf                        # the 10 most frequent noted rare words
    python tools/inspect_notes.py runs/demo --words jerusalem albedo    # chosen rare words

Writes inspect_notes.md, inspect_notes.json and read_share.png into --out (default RUN/inspect_notes).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.errors import CommandParser, ConfigError, command_line
from tnf_scale.reports.notes_inspect import write_report
from tnf_scale.run_dir import check_out_dir


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished TNF run's --output_dir")
    parser.add_argument("--words", nargs="+", help="rare words to inspect (default: the most frequent noted ones)")
    parser.add_argument("--sample", type=int, default=10, help="how many words when --words is not given")
    parser.add_argument("--neighbours", type=int, default=6, help="nearest tokens listed per vector")
    parser.add_argument("--out", help="where the report goes (default: RUN/inspect_notes)")
    args = parser.parse_args(argv)
    if args.sample < 1 or args.neighbours < 1:
        raise ConfigError("--sample and --neighbours must be at least 1.")
    out = check_out_dir(args.out or Path(args.run) / "inspect_notes", "--out")
    print(write_report(Path(args.run), out, args.words, args.sample, args.neighbours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
