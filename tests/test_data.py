"""Data pipeline: rare vocabulary, packing with spans, sampler and masking, caching."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from tnf_scale.data.collate import Collator
from tnf_scale.data.encoding import make_encoder, word_of_key
from tnf_scale.data.packing import cut_points, make_packer
from tnf_scale.data.prepared import DIGESTS_DIR, corpus_key, packed_name, prepare_data
from tnf_scale.data.rare_vocab import RareVocab, band_coverage, choose_band, count_words, word_splitter
from tnf_scale.data.sampler import GlobalBatchSampler, local_share
from tnf_scale.errors import ConfigError


def test_preparation_is_byte_identical_whatever_the_number_of_processes(small_config, prepared, tmp_path, monkeypatch):
    """1 and 2 processes count and pack the same corpus into the same rare vocabulary file, byte for byte, and the same
    sequences. Documents are grouped by 16 here so that the small corpus makes several groups (a process works on whole
    groups: with the usual 256 it is one group, and a second process would get nothing). The tokenizer is given:
    Hugging Face's WordPiece trainer itself is not deterministic, tokenizers issue #1794."""
    from tnf_scale.data import encoding
    from tnf_scale.data import prepared as preparation

    monkeypatch.setattr(encoding, "GROUP", 16)
    monkeypatch.setattr(preparation, "GROUP", 16)
    runs = {}
    for processes in (1, 2):
        config = dataclasses.replace(
            small_config,
            data_cache=str(tmp_path / str(processes)),
            num_proc=processes,
            tokenizer=str(prepared.tokenizer_dir),
        )
        runs[processes] = prepare_data(config, log=lambda *_: None, show_progress=False)
        assert json.loads((runs[processes].path / "stats.json").read_text())["num_proc"] == processes
    assert corpus_key(dataclasses.replace(config, num_proc=1)) == corpus_key(config)  # the processes are not an input
    one, two = runs[1], runs[2]
    assert one.rare_vocab_path.read_bytes() == two.rare_vocab_path.read_bytes()
    assert len(one.rare_vocab) > 100
    for split in ("train", "eval"):
        assert getattr(two, split).data.table.equals(getattr(one, split).data.table), split


def test_rare_ids_follow_descending_count_then_word(prepared):
    rare = prepared.rare_vocab
    keys = [(-c, w) for w, c in zip(rare.words, rare.counts)]
    assert keys == sorted(keys)
    assert all(rare.min_count <= c <= rare.max_count for c in rare.counts)


def test_rare_vocab_round_trips_through_its_file(prepared, tmp_path):
    prepared.rare_vocab.save(tmp_path / "v.tsv")
    assert RareVocab.load(tmp_path / "v.tsv") == prepared.rare_vocab


def test_choose_band_takes_the_rarest_recurring_words_up_to_the_coverage():
    counts = np.array(
        [1] * 500 + [2] * 100 + [3] * 50 + [8] * 20 + [40] * 5 + [1000] * 3
    )  # one count per distinct word
    total = counts.sum()  # 4210
    assert choose_band(counts, 0.09) == (2, 3)  # [2, 3] covers 350 / 4210 = 8.3%; adding 8 would cover 12.1%
    assert choose_band(counts, 0.20) == (2, 8)  # widening stops at 5 * 2 = 10
    assert band_coverage(counts, 2, 8) == 510 / total
    with pytest.raises(ConfigError, match="occurs twice"):
        choose_band(np.array([1, 1]), 0.02)


def test_spans_cover_exactly_the_subword_tokens_of_each_rare_word(prepared):
    tok, rare = prepared.tokenizer, prepared.rare_vocab
    split = word_splitter(tok)
    checked = multi = 0
    for row in prepared.train.select(range(200)):
        for r, s, t in zip(row["rare_ids"], row["span_start"], row["span_end"]):
            pieces = tok.convert_ids_to_tokens(row["input_ids"][s : t + 1])
            word = pieces[0] + "".join(p.removeprefix("##") for p in pieces[1:])
            assert word == rare.words[r]
            assert split(word) == [word]
            # the span is the whole word: the next token does not continue it
            if t + 1 < len(row["input_ids"]):
                assert not tok.convert_ids_to_tokens(row["input_ids"][t + 1]).startswith("##")
            checked += 1
            multi += t > s
    assert checked > 100 and multi > 10


def pack_text(tokenizer, text: str, rare_words: list[str], max_seq_len: int) -> dict:
    """One document encoded and packed as preparation does, `rare_words[r]` having rare id r."""
    encoded = pa.Table.from_batches(make_encoder(tokenizer)({"texts": [[text]]}).to_batches())
    rare_keys = pa.array([key_of(tokenizer, word) for word in rare_words], pa.binary())
    return make_packer(tokenizer, rare_keys, max_seq_len)(encoded).to_pydict()


def key_of(tokenizer, word: str) -> bytes:
    return np.asarray(tokenizer(word, add_special_tokens=False)["input_ids"], dtype="<i4").tobytes()


def test_words_cut_by_truncation_get_no_occurrence(prepared):
    tok = prepared.tokenizer
    word = prepared.rare_vocab.words[0]
    long_word = "pneumonoultramicroscopicsilicovolcanoconiosis"
    pieces = len(tok(long_word, add_special_tokens=False)["input_ids"])
    out = pack_text(
        tok, f"{word} {long_word} {word}", [word, long_word], max_seq_len=pieces + 1
    )  # the long word cannot fit
    found = [r for seq in out["rare_ids"] for r in seq]
    assert 1 not in found  # the truncated word
    assert found.count(0) == 2  # the rare word on both sides still counts
    for ids, s_list, t_list in zip(out["input_ids"], out["span_start"], out["span_end"]):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= pieces + 1
        for s, t in zip(s_list, t_list):
            assert tok.decode(ids[s : t + 1]).replace(" ", "") == word


def test_words_are_counted_as_the_pre_tokenizer_splits_them_and_unspellable_ones_by_their_text(prepared, small_corpus):
    """Counting keys words by their WordPiece ids (no Python object per word); the counts must be exactly those of the
    normalized, pre-tokenized words of docs/design.md, counted in Python. Words the vocabulary spells as [UNK]
    (unseen characters) are told apart by their text; a special token written in the text is not a word."""
    tok = prepared.tokenizer
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:40]]
    unspellable = ["☃☃", "ʘʘ", "Ωmega", "中文字", "naïve", "Ⅻ"]
    texts += [" ".join(unspellable[i:] + texts[i].split()[:50]) for i in range(len(unspellable))]
    assert any(tok.unk_token_id in tok(w, add_special_tokens=False)["input_ids"] for w in unspellable)
    split = word_splitter(tok)
    expected = Counter(word for text in texts for word in split(text))
    encoded = datasets.Dataset(pa.Table.from_batches(make_encoder(tok)({"texts": [texts]}).to_batches()))
    counted = count_words(encoded, merge_rows=100)  # merge often: the running totals are exercised
    got = {
        word_of_key(key, tok): count
        for key, count in zip(counted.column("key").to_pylist(), counted.column("count").to_pylist())
    }
    assert len(got) == counted.num_rows and got == dict(expected)
    plain_row = make_encoder(tok)({"texts": [["alpha [SEP] beta [MASK] alpha"]]})
    assert plain_row.schema == encoded.data.table.schema  # a row without unspellable words has the same columns' types
    with_special = count_words(datasets.Dataset(plain_row))
    assert sorted(zip(with_special.column("key").to_pylist(), with_special.column("count").to_pylist())) == sorted(
        [(key_of(tok, "alpha"), 2), (key_of(tok, "beta"), 1)]
    )


def test_cut_points_move_back_to_word_starts():
    word_start = np.array([1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1], dtype=bool)
    assert cut_points(word_start, 11, 5) == [0, 4, 6, 11]
    # a word longer than a sequence is cut where it must be
    assert cut_points(np.array([1, 0, 0, 0, 0, 0, 0, 1], dtype=bool), 8, 3) == [0, 3, 6, 8]


def test_cache_is_reused_and_its_key_follows_the_inputs(small_config, prepared, tmp_path):
    """The key is what the corpus holds and which tokenizer: a byte-identical copy elsewhere (another path, name and
    mtime) finds the same entry, one changed byte does not, and neither does another tokenizer. Planted: the key of
    the path, size and mtime fails the copy."""
    again = prepare_data(small_config, log=lambda *_: None, show_progress=False)
    assert again.path == prepared.path
    assert corpus_key(dataclasses.replace(small_config, rare_coverage=0.03)) != corpus_key(small_config)
    source = Path(small_config.corpus[0])
    moved = tmp_path / "elsewhere" / f"copy{''.join(source.suffixes)}"
    moved.parent.mkdir()
    moved.write_bytes(source.read_bytes())
    assert corpus_key(dataclasses.replace(small_config, corpus=[str(moved)])) == corpus_key(small_config)
    moved.write_bytes(source.read_bytes() + b"\n")
    assert corpus_key(dataclasses.replace(small_config, corpus=[str(moved)])) != corpus_key(small_config)
    tokenizer_copy = tmp_path / "tokenizer"
    shutil.copytree(small_config.tokenizer, tokenizer_copy)
    assert corpus_key(dataclasses.replace(small_config, tokenizer=str(tokenizer_copy))) == corpus_key(small_config)
    assert corpus_key(dataclasses.replace(small_config, tokenizer=None)) != corpus_key(small_config)


def test_a_resumed_runs_own_tokenizer_finds_the_entry_trained_for_it(small_config, tmp_path):
    """An entry whose tokenizer was trained is found again under the run's copy of that tokenizer (what a resume
    prepares with), without encoding the corpus again; an empty cache given that copy encodes with it, byte for byte
    the same rare vocabulary and sequences. Planted: without the entry's link the first lookup encodes again."""
    trained = dataclasses.replace(small_config, tokenizer=None, data_cache=str(tmp_path / "cache"))
    first = prepare_data(trained, log=lambda *_: None, show_progress=False)
    own = tmp_path / "run" / "tokenizer"
    shutil.copytree(first.tokenizer_dir, own)
    said = []
    found = prepare_data(trained, log=said.append, show_progress=False, own_tokenizer=own)
    assert not any(line.startswith("corpus:") for line in said), said  # neither read nor encoded again
    assert found.path.resolve() == first.path.resolve()
    fresh = prepare_data(
        dataclasses.replace(trained, data_cache=str(tmp_path / "empty")), lambda *_: None, False, own_tokenizer=own
    )
    assert (fresh.tokenizer_dir / "tokenizer.json").read_bytes() == (own / "tokenizer.json").read_bytes()
    assert fresh.rare_vocab_path.read_bytes() == first.rare_vocab_path.read_bytes()
    assert fresh.train.data.table.equals(first.train.data.table)


def test_another_sequence_length_packs_the_corpus_entry_without_encoding_it_again(small_config, prepared):
    """The two levels: the same corpus entry (tokenizer, rare words, encoded corpus), another packed entry in it."""
    said = []
    shorter = prepare_data(dataclasses.replace(small_config, max_seq_len=32), log=said.append, show_progress=False)
    assert corpus_key(dataclasses.replace(small_config, max_seq_len=32)) == corpus_key(small_config)
    assert shorter.corpus_entry == prepared.corpus_entry
    assert shorter.path == prepared.corpus_entry / packed_name(dataclasses.replace(small_config, max_seq_len=32))
    assert not any(line.startswith("corpus:") for line in said), said  # the corpus was neither read nor encoded
    assert shorter.rare_vocab == prepared.rare_vocab
    assert shorter.tokenizer.get_vocab() == prepared.tokenizer.get_vocab()
    assert max(len(ids) for ids in shorter.train["input_ids"]) == 32 < max(len(i) for i in prepared.train["input_ids"])
    assert shorter.stats["words"] == prepared.stats["words"]


def test_global_batch_depends_only_on_seed_step_and_size():
    a, b = GlobalBatchSampler(100, 16, seed=3), GlobalBatchSampler(100, 16, seed=3)
    for step in (0, 5, 6, 7, 40):
        assert a.step(step) == b.step(step)
    indices, keys, epochs = a.step(6)  # order positions 96..111 cross into epoch 1
    assert keys == list(range(96, 112)) and epochs[:4] == [0] * 4 and epochs[4:] == [1] * 12
    epoch0 = [i for s in range(7) for i, e in zip(*a.step(s)[::2]) if e == 0]
    assert sorted(epoch0) == list(range(100))
    assert GlobalBatchSampler(100, 16, seed=4).step(0) != a.step(0)


def test_rank_shares_partition_the_global_batch_and_an_uneven_held_out_set():
    items = list(range(32))
    assert sum((local_share(items, r, 4) for r in range(4)), []) == items
    uneven = list(range(30))
    assert [len(local_share(uneven, r, 4)) for r in range(4)] == [8, 8, 7, 7]
    assert sum((local_share(uneven, r, 4) for r in range(4)), []) == uneven


def test_a_padded_micro_batch_adds_rows_that_predict_nothing_and_read_nothing(prepared):
    batch = Collator(prepared.tokenizer, 64, 0.15, seed=7)(prepared.eval, [0, 1, 2], [0, 1, 2], [0, 0, 0])
    padded = batch.padded(5)
    assert padded.input_ids.shape[0] == 5 and torch.equal(padded.input_ids[3], batch.input_ids[0])
    assert not (padded.labels[3:] != -100).any() and not padded.in_rare_span[3:].any()
    assert torch.equal(padded.labels[:3], batch.labels) and torch.equal(padded.read_spans[0], batch.read_spans[0])
    assert batch.padded(3) is batch


@pytest.mark.parametrize("pipeline", [False, True], ids=["data-parallel", "pipeline"])
def test_every_replica_runs_as_many_held_out_micro_batches_and_together_they_score_each_sequence_once(
    small_config, prepared, pipeline
):
    """33 held-out sequences over 2 replicas in micro-batches of 16 are 17 and 16: both replicas run 2 micro-batches
    (ZeRO-3 gathers parameters collectively in each forward, so one forward fewer on a rank hangs the other), the
    shorter share's second one scoring nothing, and the two replicas' predicted and scored tokens together are one
    replica's (planted: without the emptied micro-batch, replica 1 runs 1)."""
    from tnf_scale.distributed import ParallelDims, Topology
    from tnf_scale.feeder import StepFeeder

    cfg = dataclasses.replace(small_config, eval_sequences=33, micro_batch_size=16, global_batch_size=32)
    collator = Collator(prepared.tokenizer, cfg.max_seq_len, 0.15, seed=cfg.seed)

    def share(rank: int, replicas: int) -> list:
        world = Topology(rank, rank, replicas, torch.device("cpu"), ParallelDims(1, replicas))
        return StepFeeder(cfg, world, prepared.train, prepared.eval, collator, pad_eval=pipeline).eval_batches()

    shares = [share(r, 2) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    emptied = shares[1][1]
    assert emptied.num_predicted == emptied.num_tokens == emptied.num_reads == 0 and not emptied.in_rare_span.any()
    assert (emptied.labels == -100).all() and len(emptied.occ_rare) == 0
    whole = share(0, 1)
    for count in ("num_predicted", "num_tokens", "num_reads"):
        assert sum(getattr(b, count) for s in shares for b in s) == sum(getattr(b, count) for b in whole)
    rare = [int(b.in_rare_span.flatten()[b.predicted_index].sum()) for s in (*shares, whole) for b in s]
    assert sum(rare[:4]) == sum(rare[4:])


def test_the_collator_lists_every_token_of_the_reading_spans_and_whether_a_micro_batch_holds_padding(prepared):
    """The step mixes notes at `read_token_index` (no repeat_interleave on the device) and hands the model no attention
    mask for a micro-batch without padding: both decided on the host, from the collated spans and lengths."""
    collate = Collator(prepared.tokenizer, 64, 0.15, seed=7)
    batch = collate(prepared.train, list(range(8)), list(range(8)), [0] * 8)
    assert batch.num_reads > 0
    expected = [
        (int(sample) * 64 + position, read)
        for read, (sample, start, end) in enumerate(zip(*(span.tolist() for span in batch.read_spans[1:])))
        for position in range(start, end + 1)
    ]
    assert list(zip(batch.read_token_index.tolist(), batch.read_token_occ.tolist())) == expected
    lengths = batch.lengths.tolist()
    assert batch.has_padding == (min(lengths) < 64) and (batch.model_attention_mask is None) == (min(lengths) == 64)
    full = [i for i in range(len(prepared.train)) if len(prepared.train[i]["input_ids"]) == 64][:2]
    short = [i for i in range(len(prepared.train)) if len(prepared.train[i]["input_ids"]) < 64][:1]
    assert collate(prepared.train, full, full, [0, 0]).model_attention_mask is None
    padded = collate(prepared.train, full + short, full + short, [0, 0, 0])
    assert torch.equal(padded.model_attention_mask, padded.attention_mask) and padded.has_padding


def test_masks_do_not_depend_on_position_in_the_micro_batch(prepared):
    collate = Collator(prepared.tokenizer, 64, 0.15, seed=7)
    indices, keys, epochs = [5, 9, 13, 2], [40, 41, 42, 43], [0, 0, 0, 0]
    together = collate(prepared.train, indices, keys, epochs)
    reversed_ = collate(prepared.train, indices[::-1], keys[::-1], epochs[::-1])
    for i in range(4):
        alone = collate(prepared.train, [indices[i]], [keys[i]], [epochs[i]])
        assert torch.equal(together.input_ids[i], alone.input_ids[0])
        assert torch.equal(together.labels[i], alone.labels[0])
        assert torch.equal(together.labels[i], reversed_.labels[3 - i])
    assert (together.labels != -100).any()
    other_seed = Collator(prepared.tokenizer, 64, 0.15, seed=8)(prepared.train, indices, keys, epochs)
    assert not torch.equal(other_seed.labels, together.labels)


def test_masking_spares_special_and_padding_tokens(prepared):
    batch = Collator(prepared.tokenizer, 64, 0.5, seed=1)(prepared.train, list(range(16)), list(range(16)), [0] * 16)
    tok = prepared.tokenizer
    original = torch.where(batch.labels != -100, batch.labels, batch.input_ids)
    special = torch.isin(original, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    assert not (special & (batch.labels != -100)).any()
    rate = float((batch.labels != -100).sum() / (~special).sum())
    assert 0.4 < rate < 0.6


def test_the_automatic_band_never_exceeds_the_coverage_and_says_when_nothing_fits():
    # count 2 alone covers 600 / 1630 = 36.8%: the band moves up to count 3 (30 / 1630 = 1.8%) instead
    counts = np.array([2] * 300 + [3] * 10 + [1] * 1000)
    lo, hi = choose_band(counts, 0.02)
    assert (lo, hi) == (3, 3) and band_coverage(counts, lo, hi) <= 0.02
    everything_frequent = np.array([2] * 300 + [1] * 100)  # count 2: 85.7%
    with pytest.raises(
        ConfigError,
        match=r"no count of recurring words stays within --rare_coverage 0.02 .*smallest share one count "
        r"covers is 85.7%",
    ):
        choose_band(everything_frequent, 0.02)
    word_counts = pa.table({"key": [f"w{i}".encode() for i in range(len(counts))], "count": counts})
    with pytest.raises(ConfigError, match=r"try --rare_min_count 3 --rare_max_count 3, which covers 1.84% of words"):
        RareVocab.from_counts(word_counts, 50, 60, bytes.decode)
    rare, keys = RareVocab.from_counts(word_counts, 3, 3, bytes.decode)
    assert rare.words == tuple(sorted(f"w{i}" for i in range(300, 310))) and keys.to_pylist() == [
        w.encode() for w in rare.words
    ]


def step_maker(prepared, rank: int = 0, ranks: int = 1):
    """Collates data-parallel rank `rank`'s micro-batches of a step, as the trainer does: its share of 8 samples, in
    micro-batches of 2."""
    collate = Collator(prepared.tokenizer, 64, 0.15, seed=3)
    sampler = GlobalBatchSampler(len(prepared.train), 8, seed=3)

    def make(step: int) -> list:
        indices, keys, epochs = (local_share(x, rank, ranks) for x in sampler.step(step))
        return [
            collate(prepared.train, indices[i : i + 2], keys[i : i + 2], epochs[i : i + 2])
            for i in range(0, len(indices), 2)
        ]

    return make


@pytest.fixture
def make_step(prepared):
    return step_maker(prepared)


def assert_same_batches(got: list, want: list, step: int) -> None:
    for got_batch, want_batch in zip(got, want, strict=True):
        for field in dataclasses.fields(got_batch):
            assert torch.equal(getattr(got_batch, field.name), getattr(want_batch, field.name)), (step, field.name)


@pytest.mark.parametrize("rank,ranks", [(0, 1), (0, 2), (1, 2)])
def test_prefetched_steps_hold_exactly_what_collating_on_the_spot_gives(prepared, rank, ranks):
    import psutil

    from tnf_scale.data.prefetch import StepPrefetcher

    make_step = step_maker(prepared, rank, ranks)
    expected = {step: make_step(step) for step in (0, 1, 2, 5, 6)}
    children_before = set(psutil.Process().children())
    for ahead in (True, False):
        prefetcher = StepPrefetcher(make_step, ahead=ahead)
        rng = torch.get_rng_state()
        for step in (0, 1, 2, 5, 6):  # a jump (a resume) restarts the worker there
            assert_same_batches(prefetcher.get(step), expected[step], step)
        assert torch.equal(torch.get_rng_state(), rng)  # the model's dropout draws from it: starting a worker must not
        workers = set(psutil.Process().children()) - children_before
        assert len(workers) == (1 if ahead else 0)  # a worker process collates, not a thread of this one
        prefetcher.close()
        psutil.wait_procs(workers, timeout=10)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)  # closing ends it


def test_prefetched_batches_are_page_locked_for_the_accelerator_and_copied_tensor_by_tensor(make_step, monkeypatch):
    """The trainer's accelerator path: every field of every micro-batch the worker hands over is page-locked through
    DeepSpeed's accelerator, then copied with one non-blocking copy each."""
    import tnf_scale.data.batch as batch_module
    from tnf_scale.data.prefetch import StepPrefetcher

    pinned: list[torch.Tensor] = []

    class Accelerator:
        def pin_memory(self, tensor):
            pinned.append(tensor)
            return tensor.clone()

    monkeypatch.setattr(batch_module, "get_accelerator", Accelerator)
    prefetcher = StepPrefetcher(make_step, ahead=True, pin=True)
    got = prefetcher.get(3)
    prefetcher.close()
    fields = [f.name for f in dataclasses.fields(got[0])]
    assert len(pinned) == len(fields) * len(got)
    assert_same_batches([b.to(torch.device("cpu"), non_blocking=True) for b in got], make_step(3), 3)


def prepare_command(small_config, cache) -> list[str]:
    import sys

    return [
        sys.executable,
        "-m",
        "tnf_scale.cli.prepare",
        "--corpus",
        small_config.corpus[0],
        "--data_cache",
        str(cache),
        "--vocab_size",
        "1500",
        "--max_seq_len",
        "64",
        "--rare_coverage",
        "0.05",
        "--eval_fraction",
        "0.05",
    ]


def test_two_processes_preparing_one_entry_build_it_once(small_config, tmp_path):
    import subprocess

    from conftest import REPO, clean_env

    command = prepare_command(small_config, tmp_path / "cache")
    runs = [
        subprocess.Popen(
            command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert sum("corpus:" in out for out in outputs) == 1  # one built; the other waited (or found it done) and loaded
    cache = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != DIGESTS_DIR]
    entries = [p.name for p in cache if not p.is_symlink()]
    assert [p.readlink().name for p in cache if p.is_symlink()] == entries  # found under its tokenizer's key too
    assert (
        len(entries) == 1
        and ".tmp-" not in entries[0]
        and next((tmp_path / "cache" / entries[0]).glob("packed-*/stats.json"), None)
    )


def test_a_preparation_killed_part_way_is_redone_not_loaded(small_config, tmp_path):
    import signal
    import subprocess
    import time

    from conftest import REPO, clean_env

    cache = tmp_path / "cache"
    command = prepare_command(small_config, cache)
    first = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(cache.rglob("*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert list(cache.rglob("*.tmp-*")) and not list(
        cache.glob("*/*/stats.json")
    )  # killed while staging: nothing looks complete
    again = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "corpus:" in again.stdout and "reusing" not in again.stdout
    entries = [p for p in cache.glob("*/*/stats.json") if not p.parent.parent.is_symlink()]
    assert not list(cache.rglob("*.tmp-*")) and len(entries) == 1


def test_the_tokenizer_sample_is_bounded_and_spread_over_the_corpus(small_corpus):
    from tnf_scale.data.corpus import load_corpus
    from tnf_scale.data.tokenizer import _batches

    corpus = load_corpus([str(small_corpus)], log=lambda *_: None)
    total = sum(len(t.split()) for t in corpus["text"])
    left_out = [0]
    sample = [text for batch in _batches(corpus, total // 4, left_out) for text in batch]
    words = sum(len(t.split()) for t in sample)
    assert total // 8 < words < total // 2  # about a quarter
    texts = corpus["text"]
    assert texts.index(sample[0]) == 0 and texts.index(sample[-1]) >= len(texts) - len(texts) // len(
        sample
    )  # to the end
    assert left_out == [0]  # no word of the small corpus is over 100 characters
    assert [t for batch in _batches(corpus, 10 * total, left_out) for t in batch] == corpus[
        "text"
    ]  # a small corpus is used whole


def test_data_bench_prepares_the_words_asked_for_and_reports_phases_and_memory(tmp_path):
    import sys

    from conftest import check_ok, run_cmd

    bench = [sys.executable, "tools/data_bench.py", "--words", "20000", "--num_proc", "1", "--out", str(tmp_path)]
    proc = run_cmd([*bench, "--eval_fraction", "0.25"])  # extra flags go to the preparation
    check_ok(proc)
    report = json.loads((tmp_path / "data_bench.json").read_text())
    (run,) = report["runs"]
    assert (
        report["words"] >= 20000 and run["words"] >= report["words"]
    )  # all was counted (BERT splits off punctuation too)
    assert (
        set(run["seconds"]) == {"load", "tokenizer", "count", "pack", "save"}
        and 0.1 < run["peak_anonymous_memory_gb"] < run["peak_memory_gb"]
    )
    assert "| 1 |" in (tmp_path / "data_bench.md").read_text() and "count + pack words/s" in proc.stdout
    ceiling = run["tokenizer_alone"]  # timed beside the preparation over the whole corpus: the words it counted
    assert (
        ceiling["words"] == run["words"] and ceiling["encode_words_per_s"] > 0 and "The tokenizer alone" in proc.stdout
    )
    assert "| tokenizer alone words/s | share of it |" in proc.stdout
