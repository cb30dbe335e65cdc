"""Data preparation: corpus -> tokenizer + rare vocabulary + packed Arrow sequences, cached.

The result lives in `<data_cache>/<key>/`, where the key hashes everything that changes
the output; a second run with the same inputs loads it instead of redoing the work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from tnf_scale.config import RunConfig
from tnf_scale.data.corpus import corpus_fingerprint, load_corpus
from tnf_scale.data.encoding import GROUP, encode_corpus, word_of_key
from tnf_scale.data.packing import pack_corpus
from tnf_scale.data.rare_vocab import RareVocab, band_coverage, choose_band, count_words
from tnf_scale.data.tokenizer import load_tokenizer, train_wordpiece
from tnf_scale.errors import ConfigError
from tnf_scale.run_dir import RunDir, check_out_dir
from tnf_scale.timing import PhaseTimer

FORMAT_VERSION = 4  # 2: the automatic rare band never exceeds --rare_coverage; 3: packing independent of processes;
# 4: words as the encoder splits them (a literal special token in the text is one word, not three)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    rare_vocab: RareVocab
    train: datasets.Dataset
    eval: datasets.Dataset
    stats: dict
    path: Path

    @property
    def tokenizer_dir(self) -> Path:
        return RunDir(self.path).tokenizer  # an entry lays out its tokenizer as a run directory does

    @property
    def rare_vocab_path(self) -> Path:
        return RunDir(self.path).rare_vocab


def cache_key(cfg: RunConfig) -> str:
    """Hash of every input that changes the prepared data."""
    tokenizer_spec = (
        str(Path(cfg.tokenizer).resolve())
        if cfg.tokenizer
        else f"wordpiece:{cfg.vocab_size}:{cfg.tokenizer_sample_words}"
    )
    parts = [
        FORMAT_VERSION,
        corpus_fingerprint(cfg.corpus),
        cfg.text_column,
        tokenizer_spec,
        cfg.rare_min_count,
        cfg.rare_max_count,
        cfg.rare_coverage,
        cfg.max_seq_len,
        cfg.eval_fraction,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def is_eval_sequence(index: int, eval_fraction: float, block: int = 16) -> bool:
    """Held-out sequences come in contiguous blocks, one block in every 1/eval_fraction."""
    return (index // block) % round(1 / eval_fraction) == round(1 / eval_fraction) - 1


MAX_RARE_SHARE = 0.5  # a band covering more is not rare words (the paper's covers about 20% of sentences)


def preparation_processes(cfg: RunConfig, documents: int) -> int:
    """Processes that count and pack: --num_proc, or every core for a corpus large enough to repay starting them; at
    most one per group of GROUP documents (the unit of work)."""
    wanted = cfg.num_proc if cfg.num_proc is not None else (os.cpu_count() or 1) if documents >= 20_000 else 1
    return min(wanted, max(1, math.ceil(documents / GROUP)))


@contextmanager
def progress_bars(shown: bool):
    """`datasets`' progress bars on or off for the block (off on ranks that do not report)."""
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if shown else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _build(cfg: RunConfig, out: Path, log) -> None:
    clock = PhaseTimer()
    corpus = load_corpus(cfg.corpus, cfg.text_column, log=log)
    log(f"corpus: {len(corpus)} documents")
    clock.lap("load")
    if cfg.tokenizer:
        tokenizer = load_tokenizer(cfg.tokenizer)
    else:
        tokenizer = train_wordpiece(corpus, cfg.vocab_size, cfg.max_seq_len, cfg.tokenizer_sample_words, log)
        if len(tokenizer) > cfg.vocab_size:  # the trainer keeps every character and special token whatever it is asked
            raise ConfigError(
                f"--vocab_size {cfg.vocab_size} is below the {len(tokenizer)} tokens this corpus's characters and "
                f"BERT's special tokens need; use --vocab_size {len(tokenizer)} or more."
            )
    clock.lap("tokenizer")
    num_proc = preparation_processes(cfg, len(corpus))
    if cfg.num_proc is not None and num_proc < cfg.num_proc:
        log(f"--num_proc {cfg.num_proc}: {num_proc} process{'es' if num_proc > 1 else ''} used, one per group of "
            f"{GROUP} documents")  # fmt: skip
    scratch = out / "scratch"
    encoded = encode_corpus(corpus, tokenizer, num_proc, scratch)
    word_counts = count_words(encoded)
    clock.lap("count")
    counts = word_counts.column("count").to_numpy()
    if cfg.rare_min_count is None:
        lo, hi = choose_band(counts, cfg.rare_coverage)
    else:
        lo, hi = cfg.rare_min_count, cfg.rare_max_count
    rare_share = band_coverage(counts, lo, hi)
    if cfg.rare_min_count is not None and rare_share > MAX_RARE_SHARE:  # a band given, not chosen by --rare_coverage
        raise ConfigError(
            f"the rare band {lo}..{hi} (--rare_min_count, --rare_max_count) covers "
            f"{100 * rare_share:.0f}% of this corpus's word occurrences: notes would stand in "
            f"for most words, not rare ones; choose a band of rarer words (or --rare_coverage, e.g. 0.02)."
        )
    rare, rare_keys = RareVocab.from_counts(word_counts, lo, hi, lambda key: word_of_key(key, tokenizer))
    tokenizer.save_pretrained(str(RunDir(out).tokenizer))
    rare.save(RunDir(out).rare_vocab)

    packed = pack_corpus(encoded, tokenizer, rare_keys, cfg.max_seq_len, num_proc)
    clock.lap("pack")
    held_out = [is_eval_sequence(i, cfg.eval_fraction) for i in range(len(packed))]
    train = packed.select([i for i, h in enumerate(held_out) if not h])
    evals = packed.select([i for i, h in enumerate(held_out) if h])
    if len(evals) == 0 or len(train) == 0:
        raise ConfigError(
            f"corpus {cfg.corpus} packs into only {len(packed)} sequences; give a larger corpus or a shorter "
            f"--max_seq_len."
        )
    train.save_to_disk(str(out / "train"))
    evals.save_to_disk(str(out / "eval"))
    sequences, train_sequences, eval_sequences = len(packed), len(train), len(evals)
    with_rare = pc.sum(pc.greater(pc.list_value_length(packed.data.column("rare_ids")), 0)).as_py()
    del encoded, packed, train, evals  # their files are memory-mapped from the scratch directory
    shutil.rmtree(scratch)
    clock.lap("save")

    stats = {
        "documents": len(corpus),
        "words": int(counts.sum()),
        "distinct_words": len(counts),
        "rare_band": [lo, hi],
        "rare_types": len(rare),
        "rare_word_share": rare_share,
        "sequences": sequences,
        "train_sequences": train_sequences,
        "eval_sequences": eval_sequences,
        "sequences_with_rare_share": with_rare / sequences,
        "max_seq_len": cfg.max_seq_len,
        # how this preparation ran (these two entries differ between preparations; the data does not)
        "num_proc": num_proc,
        "seconds": {phase: round(seconds, 3) for phase, seconds in clock.seconds.items()},
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(
        "prepared in "
        + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in clock.seconds.items())
        + f" ({num_proc} process{'es' if num_proc > 1 else ''}; "
        f"{stats['words'] / max(clock.seconds['count'] + clock.seconds['pack'], 1e-9):,.0f} words/s count + pack)"
    )


@contextmanager
def entry_lock(root: Path, log):
    """An exclusive lock on one cache entry across processes, jobs and nodes sharing the cache's file system: one
    prepares, the others wait, then load what it wrote."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(f"{root.name}.lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            log(f"prepared data: waiting for {lock.read().strip() or 'another process'}, which is preparing {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def prepare_data(cfg: RunConfig, log=print, show_progress: bool = True) -> PreparedData:
    """Prepared data for `cfg`, built on first use and loaded from the cache afterwards.

    The entry is built in a staging directory and renamed into place complete (stats.json marks it), under a lock:
    a preparation killed part way leaves only its staging directory, which the next preparation removes and redoes.
    """
    root = check_out_dir(cfg.data_cache, "--data_cache") / cache_key(cfg)
    if (root / "stats.json").is_file():
        log(f"prepared data: reusing {root}")
        return load_prepared(root, log)
    with entry_lock(root, log):
        if not (root / "stats.json").is_file():  # nobody finished it while we waited
            for stale in root.parent.glob(
                f"{root.name}.tmp-*"
            ):  # under the lock, any staging left is a dead preparation's
                shutil.rmtree(stale, ignore_errors=True)
            staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
            staging.mkdir(parents=True)
            try:
                with progress_bars(show_progress):
                    _build(cfg, staging, log)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(root, ignore_errors=True)  # an incomplete entry (no stats.json): never loaded
            staging.rename(root)
    return load_prepared(root, log)


def load_prepared(root: Path, log=print) -> PreparedData:
    """Load a prepared-data directory written by `prepare_data`; one written whole but damaged since is refused in
    one sentence that says how to rebuild it."""
    try:
        return _load_prepared(root, log)
    except (OSError, ValueError, KeyError) as err:  # datasets raises FileNotFoundError subclasses, pyarrow OSError
        raise ConfigError(
            f"prepared data {root} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:160]}); delete that "
            "folder and run again to prepare it anew."
        ) from None


def _load_prepared(root: Path, log) -> PreparedData:
    stats = json.loads((root / "stats.json").read_text())
    lo, hi = stats["rare_band"]
    log(
        f"rare band {lo}..{hi}: {stats['rare_types']} rare word types, "
        f"{100 * stats['rare_word_share']:.2f}% of {stats['words']} word occurrences, "
        f"{100 * stats['sequences_with_rare_share']:.1f}% of {stats['sequences']} sequences hold one"
    )
    return PreparedData(
        tokenizer=load_tokenizer(RunDir(root).tokenizer),
        rare_vocab=RareVocab.load(RunDir(root).rare_vocab),
        train=datasets.load_from_disk(str(root / "train")),
        eval=datasets.load_from_disk(str(root / "eval")),
        stats=stats,
        path=root,
    )
