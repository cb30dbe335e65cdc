"""The step never waits on the device without need: a GPU idles while the host reads a value back from it.

On this CPU nothing waits, so the test counts what would: the operations whose result size or value the host must
read from the device (a scalar read, nonzero, unique, bincount, repeat_interleave without output_size, a boolean
mask index), issued by this project's code inside training steps (tests/workers/sync_worker.py). The budget, per
step, and why each one stays:

- `unique` of the ids a step reads: the de-duplicated ids are what the read exchanges (inherent);
- `unique_consecutive` of the written ids: the number of distinct words written sizes the EMA update (inherent);
- with more than one rank, `bincount` of the owners, once for the read and once for the write: all_to_all's split
  sizes live on the host (inherent).
Not counted here because a CPU cannot show them: the step's one copy of its loss sums to the host, and with more
than one rank the split sizes' copies; and, at logged steps only, the count of words noted so far
(`distinct_noted`, a metric). Known and left: DeepSpeed's and transformers' own reads (listed apart;
transformers reads whether a micro-batch holds padding once per forward, on a pipeline once per stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import COMPARED_RUN, launch, train_args

pytestmark = pytest.mark.launcher

OURS = "tnf_scale:"
PIPELINE = {"deepspeed_config": "ds_configs/tiny_pp2.json"}
BUDGET = {  # layout: (ranks, flags, the rank counted, this project's device reads per step on that rank)
    "data parallel": (1, {}, 0, {"unique": 1, "unique_consecutive": 1}),
    "ELECTRA": (1, {"objective": "electra"}, 0, {"unique": 1, "unique_consecutive": 1}),
    "pipeline, first stage": (2, PIPELINE, 0, {"unique": 1, "unique_consecutive": 1, "bincount": 2}),
    "pipeline, last stage": (2, PIPELINE, 1, {"unique": 1, "unique_consecutive": 1, "bincount": 2}),
}  # fmt: skip


def our_reads(step: dict[str, int]) -> dict[str, int]:
    """This project's counts of one step, by kind of operation."""
    kinds: dict[str, int] = {}
    for key, count in step.items():
        kind, where = key.split(" @ ")
        if where.startswith(OURS):
            kinds[kind] = kinds.get(kind, 0) + count
    return kinds


@pytest.fixture(scope="module")
def counted_runs(small_config, tmp_path_factory):
    """Each launch's counts file prefix, launched once for the layouts that share it: (ranks, flags) -> path."""
    runs: dict[tuple, Path] = {}

    def counts(ranks: int, flags: dict) -> Path:
        key = (ranks, tuple(sorted(flags.items())))
        if key not in runs:
            tmp = tmp_path_factory.mktemp("syncs")
            args = train_args(small_config, tmp / "run", max_steps=10, **{**COMPARED_RUN, **flags})
            launch(ranks, ["tests/workers/sync_worker.py", str(tmp / "syncs"), *args])
            runs[key] = tmp / "syncs"
        return runs[key]

    return counts


@pytest.mark.parametrize("layout", list(BUDGET))
def test_a_training_step_reads_back_from_the_device_only_what_it_must(layout, counted_runs):
    ranks, flags, rank, budget = BUDGET[layout]
    steps = json.loads(Path(f"{counted_runs(ranks, flags)}.rank{rank}.json").read_text())
    for step in steps:
        assert our_reads(step) == budget, json.dumps(step, indent=1)
