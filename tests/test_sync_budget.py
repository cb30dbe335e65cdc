"""The training loop reads back from the device only what it must: on a GPU each such read idles the device while the
host waits for the queue.

On this CPU nothing waits, so tests/workers/sync_counter.py counts what would: every Python-level read of a tensor's
value (`item`, `tolist`, `cpu`, `numpy`, `bool`, `int`, `float`, `index`, `format`, `equal`, `is_nonzero`), every
copy of Python values to a device, and every op whose output size or value the host needs (nonzero, unique,
bincount, repeat_interleave without output_size, masked_select, boolean indexing, ...), over whole iterations of
train.py's own loop (tests/workers/sync_worker.py): the stop agreement, the step, the non-finite guard, the metrics
of a logged step. The worker also plants one read of each kind into a step: the counter must catch every one.

The budget below is every read of an iteration, by place; each is named and marked on the benchmarks page
("Host reads per step"). This project's reads, per iteration (g micro-batches, W ranks):
- `tolist` of the step's loss sums, one per step (inherent: the loss goes to the log and the guard);
- `float` of the gradient norm in the non-finite guard (inherent: the guard stops a diverging run);
- `unique` of the ids a step reads and `unique_consecutive` of the ids it writes (inherent: they size the note
  exchange and the EMA update);
- with W > 1, the small collectives' copies (`all_reduce_sum`: a copy of Python values and a `tolist` each; the
  step's two, the stop agreement's one, at logged steps the noted words' one) and the note exchange's split sizes
  (`bincount` of the owners and the counts' copy and `tolist`, for the read and for the write): all_to_all and the
  host-side sums need them (inherent);
- at logged steps, `int` of the words noted so far (a metric).
The libraries' reads are held to a budget of their own: DeepSpeed's gradient-norm checks (per parameter group:
BERT's two groups, decayed and not, cost one small read and one copy more than one group) and transformers' padding
check (per forward, and per stage on a pipeline: the data-parallel path hands it no mask for a micro-batch without
padding, which the collator knows).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import COMPARED_RUN, launch, train_args

pytestmark = pytest.mark.launcher

OURS = "tnf_scale/"
LIBRARIES = ("deepspeed", "transformers")
PIPELINE = {"deepspeed_config": "ds_configs/tiny_pp2.json"}
# This project's reads of an unlogged iteration, by place.
STEP = {"unique @ notes/store.py:read": 1, "unique_consecutive @ notes/note_math.py:ema_closed_form": 1,
        "float @ nonfinite.py:observe": 1}  # fmt: skip
LOSS = {"tolist @ step_strategy.py:train": 1}  # a data-parallel rank's loss sums
LAST_STAGE_LOSS = {"tolist @ model/objective.py:from_parts": 1}  # the pipeline's, on its last stage
EXCHANGE = {"bincount @ notes/store.py:_by_owner": 2, "tolist @ notes/store.py:_by_owner": 2,
            "copy of Python values @ notes/exchange.py:exchange_counts": 2,
            "tolist @ notes/exchange.py:exchange_counts": 2}  # fmt: skip
REDUCTIONS = {"copy of Python values @ distributed.py:all_reduce_sum": 3, "tolist @ distributed.py:all_reduce_sum": 3}
LAYOUTS = {  # name: (ranks, flags, the rank counted, this project's reads, transformers' at most: one per forward)
    "data parallel, 1 rank": (1, {}, 0, {**STEP, **LOSS}, 4),
    "data parallel, 2 ranks": (2, {}, 0, {**STEP, **LOSS, **EXCHANGE, **REDUCTIONS}, 2),
    "ELECTRA": (1, {"objective": "electra"}, 0, {**STEP, **LOSS}, 8),
    "pipeline, first stage": (2, PIPELINE, 0, {**STEP, **EXCHANGE, **REDUCTIONS}, 4),
    "pipeline, last stage": (2, PIPELINE, 1, {**STEP, **LAST_STAGE_LOSS, **EXCHANGE, **REDUCTIONS}, 4),
}  # fmt: skip
LOGGED = {"int @ notes/store.py:distinct_noted": 1}  # and with several ranks its sum: one more small reduction
# is_invalid_grad_norm, and per parameter group (two: decayed and not, as BERT trains) the gradient norm's
# mask_nan_or_inf_with_val_inplace and is_invalid_grad_norm
DEEPSPEED = {"bool": 3, "copy of Python values": 2}


def budget(layout: str, iteration: str) -> dict[str, int]:
    """This project's reads of one iteration of `layout`."""
    ranks, _, _, ours, _ = LAYOUTS[layout]
    if iteration == "unlogged":
        return ours
    logged = {**ours, **LOGGED}
    for key in REDUCTIONS if ranks > 1 else ():
        logged[key] += 1
    return logged


def split_counts(counts: dict[str, int]) -> dict[str, dict]:
    """This project's reads by place, the libraries' by package and kind, and the rest."""
    ours, libraries, other = {}, {name: Counter() for name in LIBRARIES}, {}
    for key, n in counts.items():
        kind, where = key.split(" @ ")
        package = where.split("/")[0]
        if where.startswith(OURS):
            ours[f"{kind} @ {where.removeprefix(OURS)}"] = n
        elif package in libraries:
            libraries[package][kind] += n
        else:
            other[key] = n
    return {"ours": ours, "libraries": {k: dict(v) for k, v in libraries.items() if v}, "other": other}


@pytest.fixture(scope="module")
def counted_runs(small_config, tmp_path_factory):
    """Each launch's counts file prefix, launched once for the layouts that share it: (ranks, flags) -> path."""
    runs: dict[tuple, Path] = {}

    def counts(ranks: int, flags: dict) -> Path:
        key = (ranks, tuple(sorted(flags.items())))
        if key not in runs:
            tmp = tmp_path_factory.mktemp("syncs")
            args = train_args(small_config, tmp / "run", **{**COMPARED_RUN, **flags})
            launch(ranks, ["tests/workers/sync_worker.py", str(tmp / "syncs"), *args])
            runs[key] = tmp / "syncs"
        return runs[key]

    return counts


def iterations(layout: str, counted_runs) -> dict[str, dict[str, int]]:
    ranks, flags, rank, _, _ = LAYOUTS[layout]
    return json.loads(Path(f"{counted_runs(ranks, flags)}.rank{rank}.json").read_text())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_counter_catches_one_planted_read_of_every_kind(layout, counted_runs):
    from workers.sync_counter import KINDS

    counted = iterations(layout, counted_runs)
    planted = Counter(counted["planted"])
    planted.subtract(counted["unlogged"])
    assert {key: n for key, n in planted.items() if n} == {f"{kind} @ plant": 1 for kind in KINDS}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("iteration", ["unlogged", "logged"])
def test_an_iteration_reads_back_from_the_device_only_what_it_must(layout, iteration, counted_runs):
    got = split_counts(iterations(layout, counted_runs)[iteration])
    assert got["ours"] == budget(layout, iteration) and not got["other"], json.dumps(got, indent=1)
    assert got["libraries"]["deepspeed"] == DEEPSPEED, got["libraries"]
    # transformers asks whether a mask holds padding: the data-parallel path hands it none without padding
    padding_checks = got["libraries"].get("transformers", {"bool": 0})
    assert padding_checks.keys() == {"bool"} and padding_checks["bool"] <= LAYOUTS[layout][4], got["libraries"]
