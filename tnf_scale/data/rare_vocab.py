"""Word counts and the rare vocabulary of docs/design.md ("Words and rare words").

A word is one unit of the tokenizer's pre-tokenizer after its normalizer. A word `w` is
rare iff `min_count <= count(w) <= max_count`; rare ids `0..R-1` follow `(-count, word)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from tnf_scale.errors import ConfigError

BAND_RATIO = 5  # the paper's band is 100..500: max_count = 5 * min_count


def word_splitter(tokenizer: PreTrainedTokenizerFast):
    """A function text -> list of words, exactly as the tokenizer's normalizer and pre-tokenizer see them."""
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda s: s)
    pre_tokenize = backend.pre_tokenizer.pre_tokenize_str

    def split(text: str) -> list[str]:
        return [word for word, _ in pre_tokenize(normalize(text))]

    return split


def count_words(encoded: datasets.Dataset, merge_rows: int = 1_000_000) -> pa.Table:
    """count(w) for every word of an encoded corpus (`encoding.encode_corpus`), as a table of `key` and `count`: the
    rows' own counts summed by key in Arrow. Per-row counts are merged into the totals whenever they outnumber them,
    so memory follows the number of distinct words, not the corpus."""
    totals = pa.table({"key": pa.array([], pa.binary()), "count": pa.array([], pa.int64())})
    pending: list[pa.Table] = []
    pending_rows = 0

    def merged() -> pa.Table:
        table = pa.concat_tables([totals, *pending])
        return table.group_by("key").aggregate([("count", "sum")]).rename_columns(["key", "count"])

    for batch in encoded.data.table.select(["keys", "counts"]).to_batches(max_chunksize=64):
        part = pa.table(
            {"key": pc.list_flatten(batch.column("keys")), "count": pc.list_flatten(batch.column("counts"))}
        )
        pending.append(part)
        pending_rows += part.num_rows
        if pending_rows >= max(totals.num_rows, merge_rows):
            totals, pending, pending_rows = merged(), [], 0
    return merged()


def band_coverage(counts: np.ndarray, lo: int, hi: int) -> float:
    """Share of word occurrences whose word count (one entry per distinct word) lies in [lo, hi]."""
    total = int(counts.sum())
    return int(counts[(counts >= lo) & (counts <= hi)].sum()) / total if total else 0.0


def choose_band(counts: np.ndarray, coverage: float) -> tuple[int, int]:
    """The rarest recurring words that cover at most `coverage` of word occurrences: [lo, hi], hi <= 5 * lo.

    `counts` holds one count per distinct word. lo is the smallest count of at least 2 (a word seen once never reads a
    note it wrote) whose words alone stay within `coverage`; hi widens one count at a time (up to the paper's max/min
    ratio of 5) while the band does. Refused in one sentence when no count stays within `coverage` (a corpus too small
    for a rare tail).
    """
    total = int(counts.sum())
    if total == 0:
        raise ConfigError("the corpus holds no words; point --corpus at text.")
    values, types = np.unique(counts, return_counts=True)  # each count value and how many word types have it
    by_count = dict(zip(values.tolist(), types.tolist()))
    recurring = [v for v in by_count if v >= 2]
    if not recurring:
        raise ConfigError(f"no word of the {len(counts)} distinct words counted occurs twice; give a larger corpus.")
    lo = next((v for v in recurring if v * by_count[v] / total <= coverage), None)
    if lo is None:
        smallest = min(v * by_count[v] for v in recurring) / total
        raise ConfigError(
            f"no count of recurring words stays within --rare_coverage {coverage:g} of the {total} word occurrences "
            f"(the smallest share one count covers is {100 * smallest:.1f}%); give a larger corpus, a larger "
            "--rare_coverage, or --rare_min_count/--rare_max_count."
        )
    hi, covered = lo, lo * by_count[lo]
    for value in (v for v in by_count if lo < v <= BAND_RATIO * lo):
        if (covered + value * by_count[value]) / total > coverage:
            break
        hi, covered = value, covered + value * by_count[value]
    return lo, hi


@dataclass(frozen=True)
class RareVocab:
    """Rare words with ids assigned by (-count, word), and the band that chose them."""

    words: tuple[str, ...]
    counts: tuple[int, ...]
    min_count: int
    max_count: int

    @classmethod
    def from_counts(
        cls, word_counts: pa.Table, min_count: int, max_count: int, word_of: Callable[[bytes], str]
    ) -> tuple[RareVocab, pa.BinaryArray]:
        """The words of `word_counts` (`count_words`) whose count lies in [min_count, max_count], and their keys in id
        order; `word_of` spells a key."""
        counts = word_counts.column("count").to_numpy()
        in_band = (counts >= min_count) & (counts <= max_count)
        if not in_band.any():
            lo, hi = choose_band(counts, 0.02)
            raise ConfigError(
                f"no word of the {len(counts)} distinct words ({counts.sum()} occurrences) counted has a count in "
                f"[{min_count}, {max_count}]; try --rare_min_count {lo} --rare_max_count {hi}, which covers "
                f"{100 * band_coverage(counts, lo, hi):.2f}% of words."
            )
        keys = word_counts.column("key").filter(pa.array(in_band)).to_pylist()
        rare = sorted((-c, word_of(key), key) for key, c in zip(keys, counts[in_band].tolist()))
        vocab = cls(tuple(w for _, w, _ in rare), tuple(-c for c, _, _ in rare), min_count, max_count)
        return vocab, pa.array([key for _, _, key in rare], pa.binary())

    def __len__(self) -> int:
        return len(self.words)

    def id_of(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def save(self, path: str | Path) -> None:
        """Write `word<TAB>id<TAB>count` lines under a header naming the band; same input, same bytes."""
        lines = [f"# rare band {self.min_count}..{self.max_count}\n", "word\tid\tcount\n"]
        lines += [f"{w}\t{i}\t{c}\n" for i, (w, c) in enumerate(zip(self.words, self.counts))]
        Path(path).write_text("".join(lines), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> RareVocab:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        lo, hi = (int(x) for x in lines[0].removeprefix("# rare band ").split(".."))
        rows = [line.split("\t") for line in lines[2:]]
        return cls(tuple(r[0] for r in rows), tuple(int(r[2]) for r in rows), lo, hi)
