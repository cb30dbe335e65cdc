"""The sharded note dictionary under the real launcher: bitwise store, W-invariant training, ZeRO 1/2/3,
re-partitioning resumes, and refused checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import COMPARED_RUN, assert_same_evaluations, launch, train_args
from safetensors.torch import load_file, save_file
from workers import store_worker

from tnf_scale.checkpoint import (
    COMPLETE,
    Checkpointer,
    CheckpointError,
    CheckpointMarker,
    plan_resume,
    rank_file,
    read_rank_files,
    write_manifest,
)
from tnf_scale.config import RunConfig
from tnf_scale.distributed import ParallelDims, Topology
from tnf_scale.metrics import read_metrics
from tnf_scale.notes.note_math import owner_of
from tnf_scale.notes.store import NoteStore
from tnf_scale.run_dir import RunDir

pytestmark = pytest.mark.launcher


def merged_rows(files: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([f["ids"] for f in files])
    order = torch.argsort(ids)
    return ids[order], torch.cat([f["vectors"] for f in files])[order]


def whole_store_after_all_steps() -> NoteStore:
    whole = NoteStore(store_worker.NUM_RARE, store_worker.DIM, seed=9, init_std=0.02, gamma=0.1)
    for step in range(store_worker.STEPS):
        occ = store_worker.global_occurrences(step)
        whole.write(occ["ids"], occ["order_key"], occ["start"], occ["notes"])
    return whole


@pytest.mark.parametrize("ranks", [4])  # 2 ranks: the training tests below, and the launcher tests
def test_store_alone_is_bitwise_identical_for_any_number_of_ranks(ranks, tmp_path):
    launch(ranks, ["tests/workers/store_worker.py", str(tmp_path)])
    files = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(ranks)]
    for r, f in enumerate(files):
        assert bool((owner_of(f["ids"], ranks) == r).all())  # each rank holds only its own rows
        assert len(f["ids"]) < store_worker.NUM_RARE * 0.8 / (ranks / 2)
    ids, vectors = merged_rows(files)
    whole = whole_store_after_all_steps()
    assert torch.equal(ids, whole.ids)
    assert torch.equal(vectors, whole.table)  # bitwise
    assert not torch.equal(whole.table, NoteStore(store_worker.NUM_RARE, store_worker.DIM, 9, 0.02, 0.1).table)


STAGES = {1: 1, 2: 2, 4: 3}  # ranks -> ZeRO stage the run uses


@pytest.fixture(scope="module")
def runs_by_world(small_config, tmp_path_factory, dp_reference_run) -> dict[int, Path]:
    """The same TNF training on 1, 2 and 4 ranks, on ZeRO stages 1, 2 and 3."""
    runs = {1: dp_reference_run}
    for ranks, stage in STAGES.items():
        if ranks > 1:
            out = tmp_path_factory.mktemp(f"w{ranks}")
            launch(
                ranks,
                [
                    "tnf_scale/train.py",
                    *train_args(
                        small_config,
                        out,
                        max_steps=20,
                        save_interval=10,
                        deepspeed_config=f"ds_configs/zero{stage}.json",
                        **COMPARED_RUN,
                    ),
                ],
            )
            runs[ranks] = out
    return runs


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_training_agrees_for_1_2_and_4_ranks_across_zero_stages(runs_by_world):
    reference = step_losses(runs_by_world[1])
    ref_notes = load_file(str(runs_by_world[1] / "notes.safetensors"))
    assert reference[20] < reference[1] - 0.3  # learns
    for ranks in (2, 4):
        losses = step_losses(runs_by_world[ranks])
        assert losses.keys() == reference.keys()
        for step, loss in reference.items():
            assert losses[step] == pytest.approx(loss, rel=1e-5), (ranks, step)
        assert_same_evaluations(
            runs_by_world[ranks], runs_by_world[1], [0, 20]
        )  # the same held-out sequences on any world size
        notes = load_file(str(runs_by_world[ranks] / "notes.safetensors"))
        assert torch.equal(notes["ids"], ref_notes["ids"])
        torch.testing.assert_close(notes["vectors"], ref_notes["vectors"], rtol=1e-5, atol=1e-6)


def test_zero_stages_train_tnf_and_log_note_traffic(runs_by_world):
    for ranks in STAGES:
        run = runs_by_world[ranks]
        marker = CheckpointMarker.read(run / "checkpoints" / "step00000020")
        assert marker.world_size == ranks
        steps = [r for r in read_metrics(run) if "loss" in r]
        last = steps[-1]
        assert last["note_ids_unique"] <= last["note_ids_requested"] == last["occurrences_read"] > 0
        assert last["note_rows_max_rank"] >= last["note_rows_min_rank"] > 0
        if ranks == 1:
            assert last["note_read_bytes_sent"] == 0 and last["note_write_bytes_sent"] == 0
        else:
            assert last["note_read_bytes_sent"] == last["note_read_bytes_received"] > 0
            assert last["note_write_bytes_sent"] == last["note_write_bytes_received"] > 0
            assert last["note_rows_max_rank"] < 0.8 * last["note_rows_min_rank"] * ranks


@pytest.mark.parametrize("ranks", [4])  # onto fewer ranks: test_electra.py resumes a 2-rank ZeRO-3 run on 1 rank
def test_resume_from_2_ranks_onto_another_number_of_ranks(ranks, runs_by_world, small_config, tmp_path, prepared):
    source = runs_by_world[2]
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000020")
    launch(
        ranks,
        [
            "tnf_scale/train.py",
            *train_args(
                small_config,
                resumed,
                max_steps=20,
                save_interval=10,
                deepspeed_config="ds_configs/zero2.json",
                resume="true",
                **COMPARED_RUN,
            ),
        ],
    )
    expected, got = step_losses(source), step_losses(resumed)
    assert got.keys() == expected.keys()
    for step in range(11, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    assert_same_evaluations(resumed, source, [20])
    files = read_rank_files(resumed / "checkpoints" / "step00000020", ranks)
    ids, vectors = merged_rows(files)
    assert torch.equal(ids, torch.arange(len(prepared.rare_vocab)))  # every rare id exactly once
    torch.testing.assert_close(vectors, load_file(str(source / "notes.safetensors"))["vectors"], rtol=1e-5, atol=1e-6)


def fake_checkpoint(root: Path, rows: list[torch.Tensor], digest: str = "d") -> Path:
    ckpt = root / "checkpoints" / "step00000005"
    ckpt.mkdir(parents=True)
    for rank, ids in enumerate(rows):
        save_file(
            {
                "ids": ids,
                "vectors": torch.zeros(len(ids), 4),
                "noted": torch.zeros(len(ids), dtype=torch.bool),
                "torch_rng_state": torch.get_rng_state(),
            },
            str(rank_file(ckpt, rank)),
        )
    (ckpt / COMPLETE).write_text(
        json.dumps(
            {
                "step": 5,
                "world_size": len(rows),
                "notes": True,
                "rare_vocab_digest": digest,
                "tokens": 0,
                "wall_time": 0.0,
            }
        )
    )
    write_manifest(ckpt, rank=0, world_size=1)
    return ckpt


def test_a_missing_or_truncated_note_shard_is_refused_by_name(tmp_path):
    """Behind the manifest check (which names any file changed since it was written), the note shards are checked
    themselves: here a manifest that agrees with shards a faulty writer left missing or cut."""
    ckpt = fake_checkpoint(tmp_path / "missing", [torch.tensor([0, 2]), torch.tensor([1, 3])])
    rank_file(ckpt, 1).unlink()
    write_manifest(ckpt, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match=r"is missing notes_rank00001\.safetensors"):
        plan_resume(tmp_path / "missing", "d", num_rare=4)
    ckpt = fake_checkpoint(tmp_path / "cut", [torch.tensor([0, 2]), torch.tensor([1, 3])])
    data = rank_file(ckpt, 0).read_bytes()
    rank_file(ckpt, 0).write_bytes(data[: len(data) // 2])
    write_manifest(ckpt, rank=0, world_size=1)
    with pytest.raises(CheckpointError, match=r"notes_rank00000\.safetensors is truncated or corrupt"):
        plan_resume(tmp_path / "cut", "d", num_rare=4)


def test_a_checkpoint_of_other_data_is_refused(tmp_path):
    fake_checkpoint(tmp_path / "other", [torch.tensor([0, 2]), torch.tensor([1, 3])], digest="abc")
    with pytest.raises(CheckpointError, match="different rare vocabulary"):
        plan_resume(tmp_path / "other", "xyz", num_rare=4)
    fake_checkpoint(tmp_path / "dup", [torch.tensor([0, 2]), torch.tensor([2, 3])])
    with pytest.raises(CheckpointError, match="each needed exactly once"):
        plan_resume(tmp_path / "dup", "d", num_rare=4)
    assert plan_resume(tmp_path / "other", "abc", num_rare=4).step == 5


def test_on_the_ranks_that_saved_it_each_rank_reads_only_its_own_file(tmp_path, monkeypatch):
    """At an unchanged world size a rank's file holds exactly its rows and streams: each rank reads that one alone
    (W files on every rank is W x the note dictionary from the shared file system) and checks it holds every id the
    rank owns; on another world size it reads them all. Planted: reading every file fails the count."""
    from tnf_scale import checkpoint

    ids = torch.arange(40)
    owners = owner_of(ids, 4)
    fake_checkpoint(tmp_path / "w4", [ids[owners == r] for r in range(4)])
    ckpt = tmp_path / "w4" / "checkpoints" / "step00000005"
    write_manifest(ckpt, rank=0, world_size=1)
    read, load = [], checkpoint.load_file
    monkeypatch.setattr(checkpoint, "load_file", lambda path: read.append(Path(path).name) or load(path))
    point = plan_resume(tmp_path / "w4", "d", num_rare=40, rank=2, world_size=4)
    assert read == ["notes_rank00002.safetensors"] and list(point.rank_files) == [2]
    read.clear()
    assert len(plan_resume(tmp_path / "w4", "d", num_rare=40, rank=0, world_size=2).rank_files) == 4 == len(read)
    owner = int(owner_of(torch.tensor([40]), 4))  # a 41st word: its owner's file lacks it
    with pytest.raises(CheckpointError, match=rf"each needed exactly once \(rank {owner} of 4\)"):
        plan_resume(tmp_path / "w4", "d", num_rare=41, rank=owner, world_size=4)


def test_a_resume_with_another_model_shape_or_fewer_steps_is_refused_before_any_run_file_changes(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, [torch.tensor([0, 1, 2, 3])])
    (run / "run_config.json").write_text(
        json.dumps({"hidden_size": 128, "max_seq_len": 64, "max_steps": 5, "tnf": "on"})
    )
    vocab = tmp_path / "rare_vocab.tsv"
    vocab.write_text("word\tid\tcount\n")
    before = (run / "run_config.json").read_bytes()
    checkpointer = Checkpointer(
        RunDir(run), Topology(0, 0, 1, torch.device("cpu"), ParallelDims(1, 1)), vocab, num_rare=4
    )
    checkpointer.rare_vocab_digest = "d"  # the fake checkpoint's
    for cfg, message in (
        (
            RunConfig(resume=True, hidden_size=256, max_seq_len=64, max_steps=5),
            "trained with --hidden_size 128, not 256",
        ),
        (RunConfig(resume=True, hidden_size=128, max_seq_len=32, max_steps=5), "--max_seq_len 64, not 32"),
        (RunConfig(resume=True, hidden_size=128, max_seq_len=64, max_steps=3), "at step 5, beyond --max_steps 3"),
    ):
        with pytest.raises(CheckpointError, match=message):
            checkpointer.plan(cfg)
    assert (run / "run_config.json").read_bytes() == before
    checkpointer.plan(RunConfig(resume=True, hidden_size=128, max_seq_len=64, max_steps=9))
    assert checkpointer.point.step == 5
