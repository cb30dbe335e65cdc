"""Check a multi-node launch before it has its nodes: `tnf-preflight --hostfile hosts [tnf-train settings]`.

The hostfile's lines, names and slots, then the run those slots would start: the parallel degrees, the micro-batch
and gradient accumulation built for the hostfile's world size by the same code train.py runs. Each problem is one
sentence naming it and the fix; exit code 2 when there is one.
"""

from __future__ import annotations

import sys

from tnf_scale.config import forwarding_parser, parse_args
from tnf_scale.ds_config import build_ds_config, micro_batch_note
from tnf_scale.errors import exit_code
from tnf_scale.preflight import preflight

# The batch arithmetic does not depend on the precision; a login node need not compute bf16 to check a GPU job.
PRECISION_UNKNOWN = (True, "the nodes' precision, not known here")


def main(argv: list[str] | None = None) -> int:
    parser = forwarding_parser(__doc__.splitlines()[0], "the run whose layout is checked")
    parser.add_argument("--hostfile", required=True)
    args, train_flags = parser.parse_known_args(argv)

    def check() -> int:
        cfg = parse_args(train_flags)
        hosts = preflight(args.hostfile, cfg.deepspeed_config)
        world = sum(slots for _, slots in hosts)
        where = f" in hostfile {args.hostfile}"
        ds, dims, _ = build_ds_config(cfg, world, PRECISION_UNKNOWN, where)
        micro, note = ds["train_micro_batch_size_per_gpu"], micro_batch_note(cfg, dims.data, where)
        print(
            f"hostfile {args.hostfile}: {len(hosts)} nodes, {world} slots, all resolve; the run: {dims.pipeline} "
            f"pipeline stages x {dims.data} data-parallel, micro-batch {micro} x {ds['gradient_accumulation_steps']} "
            f"accumulation steps = global batch {cfg.global_batch_size}{f' ({note})' if note else ''}"
        )
        return 0

    return exit_code(check)


if __name__ == "__main__":
    sys.exit(main())
