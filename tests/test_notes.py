"""Note math and the one-rank store (docs/design.md: "Read", "Write")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tnf_scale.notes.note_math import (
    application_order,
    ema_closed_form,
    ema_sequential,
    initial_notes,
    mix_notes,
    owner_of,
    pool_windows,
)
from tnf_scale.notes.store import NoteStore
from tnf_scale.seeding import mix64
from tnf_scale.spans import expand_spans, span_positions, spans_holding


def test_read_mix_changes_exactly_the_rare_spans():
    torch.manual_seed(0)
    h = torch.randn(3, 10, 8, requires_grad=True)
    sample, start, end = torch.tensor([0, 0, 2]), torch.tensor([1, 6, 4]), torch.tensor([3, 6, 8])
    rows = torch.randn(3, 8)
    token_index, token_occ = expand_spans(sample, start, end, seq_len=10)
    out = mix_notes(h, token_index, token_occ, rows, lam=0.5)
    in_span = torch.zeros(3, 10, dtype=torch.bool)
    in_span[0, 1:4] = in_span[0, 6] = in_span[2, 4:9] = True
    assert torch.equal(out[~in_span], h[~in_span])  # bitwise untouched elsewhere
    expected = {(0, p): 0 for p in range(1, 4)} | {(0, 6): 1} | {(2, p): 2 for p in range(4, 9)}
    for (b, p), occ in expected.items():
        torch.testing.assert_close(out[b, p], 0.5 * h[b, p] + 0.5 * rows[occ])
    out.sum().backward()  # gradient reaches h through (1 - lambda) only
    assert torch.allclose(h.grad[in_span], torch.full_like(h.grad[in_span], 0.5))
    assert torch.allclose(h.grad[~in_span], torch.ones_like(h.grad[~in_span]))


def test_read_mix_with_no_occurrence_is_the_identity():
    h = torch.randn(2, 5, 4)
    empty = torch.zeros(0, dtype=torch.int64)
    token_index, token_occ = expand_spans(empty, empty, empty, seq_len=5)
    assert torch.equal(mix_notes(h, token_index, token_occ, torch.zeros(0, 4), 0.5), h)


def brute_force_pool(context, sample, start, end, lengths, k):
    out = []
    for b, s, t in zip(sample.tolist(), start.tolist(), end.tolist()):
        lo, hi = max(0, s - k), min(int(lengths[b]) - 1, t + k)
        out.append(context[b, lo : hi + 1].double().mean(0))
    return torch.stack(out).float()


def test_window_pooling_at_sequence_start_end_and_padding():
    torch.manual_seed(1)
    context = torch.randn(2, 12, 6)
    lengths = torch.tensor([12, 7])  # sample 1 has 5 padding positions the window must not reach
    sample = torch.tensor([0, 0, 0, 1, 1])
    start = torch.tensor([0, 5, 10, 1, 5])
    end = torch.tensor([1, 5, 11, 2, 6])
    for k in (0, 2, 16):
        got = pool_windows(context, sample, start, end, lengths, k)
        torch.testing.assert_close(got, brute_force_pool(context, sample, start, end, lengths, k), rtol=1e-5, atol=1e-6)
    got = pool_windows(context, sample, start, end, lengths, 2)
    torch.testing.assert_close(got[4], context[1, 3:7].mean(0))  # [5-2, min(6, 6+2)]: stops at the last real token
    torch.testing.assert_close(got[0], context[0, 0:4].mean(0))  # clipped at position 0


def test_sequential_ema_equals_its_closed_form():
    torch.manual_seed(2)
    table = torch.randn(5, 4, dtype=torch.float64)
    ids = torch.tensor([3, 1, 3, 3, 0, 1, 3])
    order_key = torch.tensor([7, 2, 1, 7, 5, 9, 4])
    start = torch.tensor([9, 0, 3, 2, 1, 1, 0])
    notes = torch.randn(7, 4, dtype=torch.float64)
    perm = application_order(ids, order_key, start)
    assert ids[perm].tolist() == [0, 1, 1, 3, 3, 3, 3]
    assert order_key[perm].tolist() == [5, 2, 9, 1, 4, 7, 7] and start[perm][-2:].tolist() == [2, 9]
    expected = ema_sequential(table, ids[perm], notes[perm], gamma=0.1)
    unique, decay, contribution = ema_closed_form(ids[perm], notes[perm], gamma=0.1)
    closed = table.clone()
    closed[unique] = closed[unique] * decay.unsqueeze(1) + contribution
    torch.testing.assert_close(closed, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(closed[[2, 4]], table[[2, 4]])  # ids never written stay as they were


def test_store_applies_writes_in_order_key_order_whatever_the_input_order():
    store_a = NoteStore(6, 4, seed=1, init_std=0.02, gamma=0.1)
    store_b = NoteStore(6, 4, seed=1, init_std=0.02, gamma=0.1)
    ids, keys, starts = torch.tensor([2, 2, 5, 2]), torch.tensor([3, 1, 0, 2]), torch.tensor([4, 4, 1, 8])
    notes = torch.randn(4, 4)
    store_a.write(ids, keys, starts, notes)
    flip = torch.tensor([3, 2, 1, 0])
    store_b.write(ids[flip], keys[flip], starts[flip], notes[flip])
    assert torch.equal(store_a.table, store_b.table)
    expected = ema_sequential(NoteStore(6, 4, 1, 0.02, 0.1).table, torch.tensor([2, 2, 2, 5]), notes[[1, 3, 0, 2]], 0.1)
    torch.testing.assert_close(store_a.table, expected)
    assert store_a.distinct_noted() == 2
    torch.testing.assert_close(store_a.read(torch.tensor([5, 5])), expected[[5, 5]])


def test_initial_notes_depend_only_on_seed_and_id():
    all_rows = initial_notes(torch.arange(1000), 16, seed=5, std=0.02)
    some = torch.tensor([999, 3, 500])
    assert torch.equal(initial_notes(some, 16, seed=5, std=0.02), all_rows[some])
    assert not torch.equal(initial_notes(some, 16, seed=6, std=0.02), all_rows[some])
    assert abs(float(all_rows.std()) - 0.02) < 0.001 and abs(float(all_rows.mean())) < 0.001


def test_mix64_is_the_splitmix64_finalizer_and_spreads_owners():
    # splitmix64 with state 0: the first output is 0xE220A8397B1DCDAF
    assert int(mix64(0)) == 0xE220A8397B1DCDAF
    owners = owner_of(torch.arange(10_000), 4)
    counts = np.bincount(owners.numpy(), minlength=4)
    assert counts.min() > 2300 and counts.max() < 2700


def test_spans_holding_flags_and_span_positions():
    flags = torch.zeros(2, 10, dtype=torch.bool)
    flags[0, 4] = flags[1, 9] = True
    sample, start, end = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1, 4, 5, 0, 8]), torch.tensor([3, 4, 7, 7, 9])
    assert spans_holding(flags, sample, start, end).tolist() == [False, True, False, False, True]
    positions = span_positions(sample, start, end, (2, 10))
    assert positions[0].tolist() == [False] + [True] * 7 + [False] * 2
    assert positions[1].tolist() == [True] * 10


def test_owner_of_on_the_device_equals_the_numpy_reference_over_a_large_id_range():
    from tnf_scale.seeding import mix64_tensor

    ids = torch.cat([torch.arange(0, 2_000_000, dtype=torch.int64), torch.tensor([2**40 + 3, 2**62 + 11, 2**63 - 1])])
    reference = mix64(ids.numpy().astype(np.uint64))
    assert np.array_equal(mix64_tensor(ids).numpy().view(np.uint64), reference)  # the same 64 bits
    for world in (1, 2, 3, 7, 64, 1000, 4096):
        assert torch.equal(owner_of(ids, world), torch.from_numpy((reference % np.uint64(world)).astype(np.int64))), (
            world
        )


def numpy_initial_notes(ids: np.ndarray, dim: int, seed: int, std: float) -> np.ndarray:
    """The reference: the initial rows of docs/design.md as first written, in numpy uint64 and float64."""
    from tnf_scale.seeding import GOLDEN

    row_key = mix64(mix64(np.uint64(seed)) ^ ids.astype(np.uint64))
    with np.errstate(over="ignore"):
        bits = mix64(row_key[:, None] + np.arange(2 * dim, dtype=np.uint64)[None, :] * GOLDEN)
    uniform = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    return (np.sqrt(-2.0 * np.log(uniform[:, :dim])) * np.cos(2.0 * np.pi * uniform[:, dim:]) * std).astype(np.float32)


def test_initial_notes_in_torch_equal_the_numpy_reference_bit_for_bit():
    ids = torch.cat([torch.arange(0, 60_000, dtype=torch.int64), torch.tensor([2**40 + 3, 2**62 + 11, 2**63 - 1])])
    got = initial_notes(ids, 64, seed=1234, std=0.02, chunk=5000)  # several chunks, the last one short
    assert torch.equal(got, torch.from_numpy(numpy_initial_notes(ids.numpy(), 64, 1234, 0.02)))


def plant_note(run: Path, rare_id: int, rows: dict[int, torch.Tensor]) -> None:
    """Set rare id `rare_id`'s note to `rows[step]` in the checkpoint of each step (a 1-rank run)."""
    from safetensors.torch import load_file, save_file

    from tnf_scale.checkpoint import rank_file

    for step, row in rows.items():
        path = rank_file(run / "checkpoints" / f"step{step:08d}", 0)
        state = load_file(str(path))
        state["vectors"][int((state["ids"] == rare_id).nonzero())] = row
        save_file(state, str(path))


@pytest.mark.launcher
def test_inspect_notes_names_the_tokens_nearest_to_a_planted_note(dp_reference_run, tmp_path, capsys):
    """tools/inspect_notes.py on a copy of a tiny TNF run whose note for one rare word is planted at the embedding of
    a known token (step 10) and twice it (step 20): that token is the note's nearest at cosine 1, the note moved by
    exactly its own length, the word's own single-piece token is nearest to its embedding; the per-step read share
    is the metrics' own; bad requests are one sentence."""
    import shutil

    from transformers import AutoModel, AutoTokenizer

    from tnf_scale.cli.inspect_notes import main
    from tnf_scale.data.rare_vocab import RareVocab
    from tnf_scale.metrics import read_metrics
    from tnf_scale.run_lock import this_holder

    run = tmp_path / "run"
    shutil.copytree(dp_reference_run, run, ignore=shutil.ignore_patterns("LOCK"))
    tokenizer = AutoTokenizer.from_pretrained(str(run / "export"))
    table = AutoModel.from_pretrained(str(run / "export")).get_input_embeddings().weight.detach().float()
    rare = RareVocab.load(run / "tokenizer" / "rare_vocab.tsv")
    rare_id = next(i for i, w in enumerate(rare.words) if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1)
    word, target = rare.words[rare_id], tokenizer.convert_tokens_to_ids("the")
    plant_note(run, rare_id, {10: table[target], 20: 2 * table[target]})

    out = tmp_path / "inspect"
    assert main([str(run), "--words", word, "--neighbours", "3", "--out", str(out)]) == 0
    report = json.loads((out / "inspect_notes.json").read_text())
    assert report["checkpoints"] == [10, 20] and 0 < report["noted_words"] <= report["rare_words"]
    (got,) = report["words"]
    assert got["word"] == word and got["rare_id"] == rare_id and got["count"] == rare.counts[rare_id]
    assert got["note_neighbours"][0] == ["the", 1.0] and len(got["note_neighbours"]) == 3
    assert got["embedding_neighbours"][0] == [word, 1.0]  # the word's one piece is its own embedding
    assert got["moved"] == 1.0 and got["note_norm"] == pytest.approx(2 * float(table[target].norm()), abs=1e-4)
    steps = [r for r in read_metrics(run) if "occurrences_read" in r]
    assert report["read_share"] == [
        [r["step"], r["occurrences_read"] / (r["occurrences_read"] + r["occurrences_skipped_masked"])] for r in steps
    ]
    assert (out / "read_share.png").stat().st_size > 0 and f"| {word} ({got['count']}) |" in (
        out / "inspect_notes.md"
    ).read_text()
    capsys.readouterr()
    (run / "LOCK").write_text(json.dumps(this_holder()))  # as if the run were still training (this process holds it)
    assert main([str(run), "--sample", "2", "--out", str(tmp_path / "sample")]) == 0
    assert f"warning: {run} is still training" in capsys.readouterr().err
    sampled = json.loads((tmp_path / "sample" / "inspect_notes.json").read_text())["words"]
    assert len(sampled) == 2 and all(w["rare_id"] < len(rare.words) for w in sampled)
    assert main([str(run), "--words", "notarareword", "--out", str(tmp_path / "two")]) == 2
    assert "'notarareword' is not one of the run's rare words" in capsys.readouterr().err
