"""Run state owned once: the components' state_dict / load_state_dict and the checkpoint marker's one reader."""

from __future__ import annotations

import json

import pytest
import torch

from tnf_scale.checkpoint import COMPLETE, CheckpointMarker, union_of_ranks
from tnf_scale.config import RunConfig, resume_conflict
from tnf_scale.notes.exchange import ExchangeGroup
from tnf_scale.notes.store import NoteStore
from tnf_scale.run_state import RngStreams, TrainingProgress


def test_progress_advances_and_round_trips():
    progress = TrainingProgress()
    progress.advance(tokens=100, wall_time=1.5)
    progress.advance(tokens=50, wall_time=2.5)
    assert progress.state_dict() == {"step": 2, "tokens": 150, "wall_time": 2.5}
    again = TrainingProgress()
    again.load_state_dict({**progress.state_dict(), "world_size": 4})  # the marker's other keys are not its own
    assert again == progress


def test_rng_streams_restore_this_ranks_stream_and_keep_their_own_without_one():
    saved = RngStreams().state_dict()
    expected = torch.rand(3)
    RngStreams().load_state_dict(saved)
    assert torch.equal(torch.rand(3), expected)
    before = torch.get_rng_state()
    RngStreams().load_state_dict({})  # a rank the checkpoint did not have
    assert torch.equal(torch.get_rng_state(), before)


def test_the_marker_reads_back_and_reads_markers_of_older_runs(tmp_path):
    marker = CheckpointMarker(step=6, world_size=2, notes=True, tokens=99, wall_time=1.0, rare_vocab_digest="d",
                              pipeline_stages=2, zero_stage=1)  # fmt: skip
    marker.write(tmp_path)
    assert CheckpointMarker.read(tmp_path) == marker and not (tmp_path / f"{COMPLETE}.tmp").exists()
    old = {"step": 3, "world_size": 1, "notes": False, "tokens": 5, "wall_time": 0.5, "rare_vocab_digest": "d"}
    (tmp_path / COMPLETE).write_text(json.dumps(old))  # before pipeline stages and ZeRO stages were recorded
    read = CheckpointMarker.read(tmp_path)
    assert (read.step, read.pipeline_stages, read.zero_stage) == (3, 1, None)


@pytest.mark.parametrize("saved_on, loaded_on", [(2, 1), (2, 4), (4, 3)])
def test_the_store_takes_its_own_rows_out_of_any_partition(saved_on, loaded_on):
    num_rare, dim = 50, 4

    def store(rank: int, size: int) -> NoteStore:
        return NoteStore(num_rare, dim, seed=7, init_std=0.02, gamma=0.1, exchange=ExchangeGroup(rank, size))

    shards = [store(rank, saved_on) for rank in range(saved_on)]
    for shard in shards:
        shard.table += torch.arange(len(shard.ids), dtype=torch.float32)[:, None] + shard.ids[:, None]  # trained rows
        shard.noted[::2] = True
    saved = union_of_ranks([shard.state_dict() for shard in shards])
    whole = {int(i): (v, n) for i, v, n in zip(saved["ids"], saved["vectors"], saved["noted"])}
    for rank in range(loaded_on):
        loaded = store(rank, loaded_on)
        loaded.load_state_dict(saved)
        for i, row, noted in zip(loaded.ids.tolist(), loaded.table, loaded.noted):
            assert torch.equal(row, whole[i][0]) and bool(noted) == bool(whole[i][1])


def test_a_resume_must_keep_the_configs_shape_fields():
    saved = {"hidden_size": 128, "max_steps": 300, "seed": 1234}
    assert resume_conflict(saved, RunConfig(hidden_size=128, max_steps=900)) is None  # more steps: a longer run
    assert resume_conflict(saved, RunConfig(hidden_size=256)) == "hidden_size"
    assert resume_conflict(saved, RunConfig(seed=1)) == "seed"
