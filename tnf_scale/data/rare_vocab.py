"""Word counts and the rare vocabulary of TNF_SPEC section 1.

A word is one unit of the tokenizer's pre-tokenizer after its normalizer. A word `w` is
rare iff `min_count <= count(w) <= max_count`; rare ids `0..R-1` follow `(-count, word)`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerFast

from tnf_scale.config import ConfigError

BAND_RATIO = 5  # the paper's band is 100..500: max_count = 5 * min_count


def word_splitter(tokenizer: PreTrainedTokenizerFast):
    """A function text -> list of words, exactly as the tokenizer's normalizer and pre-tokenizer see them."""
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda s: s)
    pre_tokenize = backend.pre_tokenizer.pre_tokenize_str

    def split(text: str) -> list[str]:
        return [word for word, _ in pre_tokenize(normalize(text))]

    return split


def count_words(corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, num_proc: int = 1) -> Counter:
    """count(w) for every word of the corpus, counted in `num_proc` processes: each batch of documents yields its own
    (word, count) rows, and Arrow sums them by word, so the corpus is never held as Python words."""
    split = word_splitter(tokenizer)

    def count_batch(batch: dict) -> dict:
        counts = Counter(word for text in batch["text"] for word in split(text))
        return {"word": list(counts), "count": list(counts.values())}

    per_batch = corpus.map(count_batch, batched=True, batch_size=1000, remove_columns=corpus.column_names,
                           num_proc=num_proc if num_proc > 1 else None, desc="counting words")
    totals = per_batch.data.table.group_by("word").aggregate([("count", "sum")])
    return Counter(dict(zip(totals.column("word").to_pylist(), totals.column("count_sum").to_pylist())))


def band_coverage(counts: Counter, lo: int, hi: int) -> float:
    """Share of word occurrences whose word count lies in [lo, hi]."""
    total = sum(counts.values())
    return sum(c for c in counts.values() if lo <= c <= hi) / total if total else 0.0


def choose_band(counts: Counter, coverage: float) -> tuple[int, int]:
    """The rarest recurring words that cover at most `coverage` of word occurrences: [lo, hi], hi <= 5 * lo.

    lo is the smallest count of at least 2 (a word seen once never reads a note it wrote) whose words alone stay
    within `coverage`; hi widens one count at a time (up to the paper's max/min ratio of 5) while the band does.
    Refused in one sentence when no count stays within `coverage` (a corpus too small for a rare tail).
    """
    total = sum(counts.values())
    if total == 0:
        raise ConfigError("the corpus holds no words; point --corpus at text.")
    by_count = Counter(counts.values())  # count value -> number of word types with it
    recurring = sorted(v for v in by_count if v >= 2)
    if not recurring:
        raise ConfigError(f"no word of the {len(counts)} distinct words counted occurs twice; give a larger corpus.")
    lo = next((v for v in recurring if v * by_count[v] / total <= coverage), None)
    if lo is None:
        smallest = min(v * by_count[v] for v in recurring) / total
        raise ConfigError(f"no count of recurring words stays within --rare_coverage {coverage:g} of the {total} word occurrences "
                          f"(the smallest share one count covers is {100 * smallest:.1f}%); give a larger corpus, a larger "
                          "--rare_coverage, or --rare_min_count/--rare_max_count.")
    hi, covered = lo, lo * by_count[lo]
    for value in sorted(v for v in by_count if lo < v <= BAND_RATIO * lo):
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
    def from_counts(cls, counts: Counter, min_count: int, max_count: int) -> RareVocab:
        rare = sorted(((-c, w) for w, c in counts.items() if min_count <= c <= max_count))
        if not rare:
            lo, hi = choose_band(counts, 0.02)
            raise ConfigError(
                f"no word of the {len(counts)} distinct words ({sum(counts.values())} occurrences) counted has a count in "
                f"[{min_count}, {max_count}]; try --rare_min_count {lo} --rare_max_count {hi}, which covers "
                f"{100 * band_coverage(counts, lo, hi):.2f}% of words."
            )
        return cls(tuple(w for _, w in rare), tuple(-c for c, _ in rare), min_count, max_count)

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
