"""Export a tnf_scale run as a Hugging Face BertForMaskedLM (no notes), from its newest complete checkpoint.

    python tools/export.py --run runs/demo --out runs/demo/export
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tnf_scale.checkpoint import latest_complete  # noqa: E402
from tnf_scale.config import ConfigError, exit_code  # noqa: E402
from tnf_scale.model.export import export_hf  # noqa: E402
from tnf_scale.run_dir import RunDir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run's --output_dir")
    parser.add_argument("--out", help="export directory (default: RUN/export)")
    args = parser.parse_args(argv)
    run = Path(args.run)

    def export() -> int:
        ckpt = latest_complete(run)
        if ckpt is None:
            raise ConfigError(f"{run} holds no complete checkpoint; train with --output_dir {run} first.")
        print(f"exported {ckpt} -> {export_hf(run, ckpt, Path(args.out) if args.out else RunDir(run).export)}")
        return 0

    return exit_code(export)


if __name__ == "__main__":
    sys.exit(main())
