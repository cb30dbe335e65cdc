"""Export a tnf_scale run as a Hugging Face BertForMaskedLM (no notes), from its newest or a named checkpoint.

    python tools/export.py --run runs/demo --out runs/demo/export [--checkpoint step00000200]

The checkpoint's files are checked against its manifest first; non-finite weights are never exported.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tnf_scale.checkpoint import check_manifest, complete_checkpoints
from tnf_scale.errors import CommandParser, ConfigError, exit_code
from tnf_scale.model.export import export_hf
from tnf_scale.run_dir import RunDir, check_out_dir


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run's --output_dir")
    parser.add_argument("--out", help="export directory (default: RUN/export)")
    parser.add_argument(
        "--checkpoint", help="a complete checkpoint of the run by name, e.g. step00000200 (default: the newest)"
    )
    args = parser.parse_args(argv)
    run = Path(args.run)

    def export() -> int:
        if args.out:
            check_out_dir(args.out, "--out")
        if not RunDir(run).holds_run():
            raise ConfigError(
                f"--run {run} is not a run's output directory (no metrics, checkpoints or export in it); point it at "
                "the --output_dir of a training run."
            )
        done = complete_checkpoints(run)
        if not done:
            raise ConfigError(
                f"{run} holds no complete checkpoint yet; export once the run has saved one (every --save_interval "
                "steps and at its end)."
            )
        named = [c for c in done if c.name == args.checkpoint]
        if args.checkpoint and not named:
            raise ConfigError(
                f"--checkpoint {args.checkpoint} is not a complete checkpoint of {run}; choose one of "
                f"{', '.join(c.name for c in done)}."
            )
        ckpt = named[0] if named else done[-1]
        check_manifest(ckpt, rank=0, world_size=1)
        print(f"exported {ckpt} -> {export_hf(run, ckpt, Path(args.out) if args.out else RunDir(run).export)}")
        return 0

    return exit_code(export)


if __name__ == "__main__":
    sys.exit(main())
