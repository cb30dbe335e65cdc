"""Prepare a run's data once, before the training job, with the data flags train.py takes:

    python -m tnf_scale.cli.prepare --preset bert-large --corpus /data/wiki /data/books

Writes the cache entry train.py will load (`--data_cache`, default .cache/tnf_data). On a cluster, run it as
its own step or job before training (see slurm/README.md); train.py prepares only when the entry is missing,
and then one process per cache file system does it while the others wait.
"""

from __future__ import annotations

import sys

from tnf_scale.config import DataSettings, parse_args
from tnf_scale.data.prepared import prepare_data
from tnf_scale.errors import exit_code


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        data = prepare_data(
            parse_args(
                argv,
                sections=(DataSettings,),
                description="Prepare a run's data once, before the training job: the data settings train.py takes.",
            )
        )
        print(f"prepared data: {data.path}")
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
