"""Check a hostfile before a multi-node launch: `tnf-preflight --hostfile hosts [--deepspeed_config F]`.

Each problem is one sentence naming it and the fix; exit code 2 when there is one.
"""

from __future__ import annotations

import argparse
import sys

from tnf_scale.errors import exit_code
from tnf_scale.preflight import preflight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostfile", required=True)
    parser.add_argument("--deepspeed_config")
    args = parser.parse_args(argv)

    def check() -> int:
        hosts = preflight(args.hostfile, args.deepspeed_config)
        print(f"hostfile {args.hostfile}: {len(hosts)} nodes, {sum(s for _, s in hosts)} slots, all resolve")
        return 0

    return exit_code(check)


if __name__ == "__main__":
    sys.exit(main())
