"""Data preparation: corpus -> tokenizer + rare vocabulary + packed Arrow sequences, cached in two levels.

`<data_cache>/<key>/` is the corpus entry, where the key hashes everything that changes the tokenizer, the word
counts and the rare vocabulary; it keeps the encoded corpus, and holds one packed entry per sequence length and
held-out share (`packed-<max_seq_len>-<eval_fraction>/`). A second run with the same inputs loads both; a run at
another sequence length packs the encoded corpus without tokenizing it again, with the same tokenizer and rare words.
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
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import feather
from transformers import PreTrainedTokenizerFast

from tnf_scale.config import RunConfig
from tnf_scale.data.corpus import corpus_fingerprint, load_corpus
from tnf_scale.data.encoding import GROUP, encode_corpus, word_of_key
from tnf_scale.data.packing import pack_corpus
from tnf_scale.data.rare_vocab import RareVocab, band_coverage, choose_band, count_words
from tnf_scale.data.tokenizer import load_tokenizer, train_wordpiece
from tnf_scale.errors import ConfigError
from tnf_scale.run_dir import RARE_VOCAB_FILE, RunDir, check_out_dir
from tnf_scale.timing import PhaseTimer

FORMAT_VERSION = 6  # 2: the automatic rare band never exceeds --rare_coverage; 3: packing independent of processes;
# 4: words as the encoder splits them (a literal special token in the text is one word, not three); 5: two levels;
# 6: the corpus keyed by its content
CORPUS_DONE = "corpus.json"  # marks a complete corpus entry; stats.json marks a complete packed entry
ENCODED_DIR = "encoded"
RARE_KEYS_FILE = "rare_keys.arrow"
DIGESTS_DIR = "digests"  # inside --data_cache: each corpus file's sha256, per version of the file


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerFast
    rare_vocab: RareVocab
    train: datasets.Dataset
    eval: datasets.Dataset
    stats: dict
    path: Path  # the packed entry (train/, eval/, stats.json), inside the corpus entry

    @property
    def corpus_entry(self) -> Path:
        return self.path.parent

    @property
    def tokenizer_dir(self) -> Path:
        return RunDir(self.corpus_entry).tokenizer  # an entry lays out its tokenizer as a run directory does

    @property
    def rare_vocab_path(self) -> Path:
        return RunDir(self.corpus_entry).rare_vocab


def corpus_key(cfg: RunConfig, tokenizer: Path | None = None, fingerprint: str | None = None) -> str:
    """Hash of every input that changes the corpus entry: what the corpus holds (not where it lies), the tokenizer (a
    given one by its files' bytes, a trained one by its settings), the text column and the rare band's settings.
    `tokenizer` (a resumed run's own) stands for --tokenizer; `fingerprint`, the corpus's if already taken."""
    tokenizer = tokenizer or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    tokenizer_spec = (
        f"tokenizer:{tokenizer_digest(tokenizer)}"
        if tokenizer
        else f"wordpiece:{cfg.vocab_size}:{cfg.tokenizer_sample_words}"
    )
    parts = [
        FORMAT_VERSION,
        fingerprint or corpus_fingerprint(cfg.corpus, Path(cfg.data_cache) / DIGESTS_DIR),
        cfg.text_column,
        tokenizer_spec,
        cfg.rare_min_count,
        cfg.rare_max_count,
        cfg.rare_coverage,
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def tokenizer_digest(folder: Path) -> str:
    """sha256 of a tokenizer folder's files (names and bytes), the rare vocabulary kept beside them left out."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name != RARE_VOCAB_FILE):
        with open(path, "rb") as f:
            digest.update(f"{path.name}:{hashlib.file_digest(f, 'sha256').hexdigest()};".encode())
    return digest.hexdigest()


def packed_name(cfg: RunConfig) -> str:
    """The packed entry inside the corpus entry: what packing and the held-out split depend on."""
    return f"packed-{cfg.max_seq_len}-{cfg.eval_fraction}"


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


def _build_corpus(cfg: RunConfig, out: Path, log, given_tokenizer: Path | None) -> None:
    """The corpus entry: the tokenizer (`given_tokenizer`, else trained), the encoded corpus (kept, so that another
    sequence length packs it without tokenizing again), the word counts' rare band and the rare vocabulary with its
    keys."""
    clock = PhaseTimer()
    corpus = load_corpus(cfg.corpus, cfg.text_column, log=log)
    log(f"corpus: {len(corpus)} documents")
    clock.lap("load")
    if given_tokenizer:
        tokenizer = load_tokenizer(given_tokenizer)
    else:
        tokenizer = train_wordpiece(corpus, cfg.vocab_size, cfg.tokenizer_sample_words, log)
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
    if given_tokenizer and (Path(given_tokenizer) / "tokenizer.json").is_file():  # kept as given, byte for byte
        shutil.copytree(given_tokenizer, RunDir(out).tokenizer, ignore=shutil.ignore_patterns(RARE_VOCAB_FILE))
    else:
        tokenizer.save_pretrained(str(RunDir(out).tokenizer))
    rare.save(RunDir(out).rare_vocab)
    feather.write_feather(pa.table({"key": rare_keys}), str(out / RARE_KEYS_FILE))
    encoded.save_to_disk(str(out / ENCODED_DIR))
    del encoded  # memory-mapped from the scratch directory
    shutil.rmtree(scratch)
    clock.lap("save")
    stats = {
        "documents": len(corpus),
        "words": int(counts.sum()),
        "distinct_words": len(counts),
        "rare_band": [lo, hi],
        "rare_types": len(rare),
        "rare_word_share": rare_share,
        # how this preparation ran (these two entries differ between preparations; the data does not)
        "num_proc": num_proc,
        "seconds": {phase: round(seconds, 3) for phase, seconds in clock.seconds.items()},
    }
    (out / CORPUS_DONE).write_text(json.dumps(stats, indent=2) + "\n")


def _build_packed(cfg: RunConfig, corpus_entry: Path, out: Path, log) -> None:
    """The packed entry: the corpus entry's encoded corpus packed into sequences of --max_seq_len and split."""
    clock = PhaseTimer()
    try:
        corpus_stats = json.loads((corpus_entry / CORPUS_DONE).read_text())
        tokenizer = load_tokenizer(RunDir(corpus_entry).tokenizer)
        encoded = datasets.load_from_disk(str(corpus_entry / ENCODED_DIR))
        rare_keys = feather.read_table(str(corpus_entry / RARE_KEYS_FILE)).column("key").combine_chunks()
    except (OSError, ValueError, KeyError, ConfigError) as err:
        raise damaged(corpus_entry, err) from None
    num_proc = preparation_processes(cfg, corpus_stats["documents"])
    packed = pack_corpus(encoded, tokenizer, rare_keys, cfg.max_seq_len, num_proc, out / "scratch")
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
    del packed, train, evals  # memory-mapped from the scratch directory
    shutil.rmtree(out / "scratch")
    clock.lap("save")
    seconds = {**corpus_stats["seconds"], **{phase: round(t, 3) for phase, t in clock.seconds.items()}}
    seconds["save"] = round(corpus_stats["seconds"]["save"] + clock.seconds["save"], 3)
    stats = {
        **corpus_stats,
        "sequences": sequences,
        "train_sequences": train_sequences,
        "eval_sequences": eval_sequences,
        "sequences_with_rare_share": with_rare / sequences,
        "max_seq_len": cfg.max_seq_len,
        "num_proc": num_proc,
        "seconds": seconds,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(
        "prepared in "
        + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in clock.seconds.items())
        + f" ({num_proc} process{'es' if num_proc > 1 else ''}; "
        f"{stats['words'] / max(seconds.get('count', 0) + clock.seconds['pack'], 1e-9):,.0f} words/s count + pack)"
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


def prepare_data(
    cfg: RunConfig, log=print, show_progress: bool = True, own_tokenizer: Path | None = None
) -> PreparedData:
    """Prepared data for `cfg`, built on first use and loaded from the cache afterwards, in two levels: the corpus
    entry (tokenizer, encoded corpus, rare vocabulary) is shared by every sequence length, and holds one packed entry
    per --max_seq_len (a phase 2 at 512 tokens packs the corpus phase 1 encoded). `own_tokenizer`, a resumed run's, is
    the one the data is encoded with, whatever --tokenizer says: a checkpoint's embeddings belong to its ids."""
    cache = check_out_dir(cfg.data_cache, "--data_cache")
    given = own_tokenizer or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    if given:
        load_tokenizer(given)  # a folder that holds no tokenizer is one sentence before its files are hashed
    fingerprint = corpus_fingerprint(cfg.corpus, cache / DIGESTS_DIR)  # once: it lists and stats every file
    corpus_entry = cache / corpus_key(cfg, given, fingerprint)
    with progress_bars(show_progress):
        ensure_entry(corpus_entry, CORPUS_DONE, lambda out: _build_corpus(cfg, out, log, given), log)
        alias_by_tokenizer(cfg, corpus_entry, fingerprint)
        root = corpus_entry / packed_name(cfg)
        ensure_entry(root, "stats.json", lambda out: _build_packed(cfg, corpus_entry, out, log), log)
    return load_prepared(root, log)


def alias_by_tokenizer(cfg: RunConfig, corpus_entry: Path, fingerprint: str) -> None:
    """The entry is also found under the key its own tokenizer gives (a symbolic link): a resume, which prepares with
    the run's copy of that tokenizer, and a phase 2 given phase 1's, find it instead of encoding the corpus again."""
    alias = corpus_entry.with_name(corpus_key(cfg, RunDir(corpus_entry).tokenizer, fingerprint))
    if alias == corpus_entry or alias.exists():
        return
    staging = alias.with_name(f"{alias.name}.link-{os.getpid()}")
    staging.unlink(missing_ok=True)
    staging.symlink_to(corpus_entry.name)
    try:
        staging.rename(alias)  # whole or not at all; a link made meanwhile is replaced by an equal one
    except OSError:  # an entry built under that key meanwhile: it stays
        staging.unlink()


def ensure_entry(root: Path, done: str, build, log) -> None:
    """Build the cache entry `root` (complete once it holds `done`) unless it is there.

    The entry is built in a staging directory and renamed into place complete, under a lock: a preparation killed
    part way leaves only its staging directory, which the next preparation removes and redoes.
    """
    if (root / done).is_file():
        log(f"prepared data: reusing {root}")
        return
    with entry_lock(root, log):
        if (root / done).is_file():  # somebody finished it while we waited
            return
        for stale in root.parent.glob(f"{root.name}.tmp-*"):  # under the lock, any staging left is a dead preparation's
            shutil.rmtree(stale, ignore_errors=True)
        staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        staging.mkdir(parents=True)
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(root, ignore_errors=True)  # an incomplete entry (no `done` file): never loaded
        staging.rename(root)


def load_prepared(root: Path, log=print) -> PreparedData:
    """Load a prepared-data directory written by `prepare_data`; one written whole but damaged since is refused in
    one sentence that says how to rebuild it."""
    try:
        return _load_prepared(root, log)
    except (OSError, ValueError, KeyError) as err:  # datasets raises FileNotFoundError subclasses, pyarrow OSError
        raise damaged(root, err) from None


def damaged(root: Path, err: Exception) -> ConfigError:
    """The one sentence for a cache entry written whole but damaged since."""
    return ConfigError(
        f"prepared data {root} is damaged ({type(err).__name__}: {str(err).splitlines()[0][:160]}); delete that "
        "folder and run again to prepare it anew."
    )


def _load_prepared(root: Path, log) -> PreparedData:
    stats = json.loads((root / "stats.json").read_text())
    lo, hi = stats["rare_band"]
    log(
        f"rare band {lo}..{hi}: {stats['rare_types']} rare word types, "
        f"{100 * stats['rare_word_share']:.2f}% of {stats['words']} word occurrences, "
        f"{100 * stats['sequences_with_rare_share']:.1f}% of {stats['sequences']} sequences hold one"
    )
    return PreparedData(
        tokenizer=load_tokenizer(RunDir(root.parent).tokenizer),
        rare_vocab=RareVocab.load(RunDir(root.parent).rare_vocab),
        train=datasets.load_from_disk(str(root / "train")),
        eval=datasets.load_from_disk(str(root / "eval")),
        stats=stats,
        path=root,
    )
