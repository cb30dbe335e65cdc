"""Run under `deepspeed --num_gpus W`: feed the sharded note store identical occurrences for several steps.

Every rank checks that its reads equal those of a whole (W = 1) store fed the same global
occurrences, bit for bit, and saves its final rows to OUT/rank{r}.safetensors.
Usage: store_worker.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import save_file

from tnf_scale.distributed import discover, end_process_groups, init_distributed
from tnf_scale.node_check.device_notes import DIM, NUM_RARE, SAMPLES_PER_STEP, STEPS
from tnf_scale.node_check.device_notes import occurrences as global_occurrences
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.store import NoteStore


def main(out: Path) -> None:
    world = init_distributed(discover())
    sharded = NoteStore(
        NUM_RARE,
        DIM,
        seed=9,
        init_std=0.02,
        gamma=0.1,
        exchange=ExchangeGroup(world.note_group_rank, world.note_group_size),
    )
    whole = NoteStore(NUM_RARE, DIM, seed=9, init_std=0.02, gamma=0.1)
    per_rank = SAMPLES_PER_STEP // world.size
    for step in range(STEPS):
        occ = global_occurrences(step)
        mine = (occ["sample"] // per_rank) == world.rank
        got = sharded.read(occ["ids"][mine])
        assert torch.equal(got, whole.read(occ["ids"][mine])), f"rank {world.rank}: read differs at step {step}"
        sharded.write(occ["ids"][mine], occ["order_key"][mine], occ["start"][mine], occ["notes"][mine])
        whole.write(occ["ids"], occ["order_key"], occ["start"], occ["notes"])
    sharded.read(torch.zeros(0, dtype=torch.int64))  # a rank with nothing to ask still takes part
    state = sharded.state_dict()
    save_file(state, str(out / f"rank{world.rank}.safetensors"))
    deepspeed.comm.barrier()
    end_process_groups()


if __name__ == "__main__":
    main(Path(sys.argv[-1]))  # the launcher puts --local_rank first
