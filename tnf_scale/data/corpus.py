"""Load a pre-training corpus as one `datasets.Dataset` with a single `text` column.

Accepted entries: local .txt / .jsonl / .json / .parquet files (optionally .gz, .xz or .bz2
compressed), folders holding them, or a `datasets` hub name such as
`wikimedia/wikipedia:20231101.en` (name, then an optional `:config`).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow

from tnf_scale.errors import ConfigError

COMPRESSIONS = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
# What reading a damaged or mislabelled file raises, from the decompressors, the JSON and Parquet readers and datasets
UNREADABLE = (
    datasets.exceptions.DatasetGenerationError,
    pyarrow.ArrowException,
    EOFError,
    OSError,
    lzma.LZMAError,
    zlib.error,
    ValueError,
)
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _builder_for(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _compressed_unreadably(path: Path) -> bool:
    """A zstd file, or a corpus file (its inner suffix .txt, .jsonl, ...) under a compression not read here."""
    suffixes = path.suffixes
    return path.suffix == ".zst" or (
        len(suffixes) > 1 and suffixes[-2] in BUILDERS and suffixes[-1] not in COMPRESSIONS
    )


def _check_compression(path: Path | None) -> None:
    """Refuse a corpus file compressed in a way not read here, also inside a folder (skipping it would drop part
    of the corpus without a word)."""
    if path is not None:
        kind = {".zst": "zstd"}.get(path.suffix, path.suffix[1:])
        raise ConfigError(
            f"corpus file {path} is {kind}-compressed, which is not read here; decompress it or compress it with xz, "
            "gzip or bzip2."
        )


def _expand(entry: str) -> list[Path] | None:
    """Files an entry names, or None when it is not a local path (a hub name)."""
    path = Path(entry).expanduser()
    if path.is_dir():
        inside = sorted(p for p in path.rglob("*") if p.is_file())
        _check_compression(next((p for p in inside if _compressed_unreadably(p)), None))
        files = [p for p in inside if _builder_for(p)]
        if not files:
            raise ConfigError(
                f"corpus folder {entry} holds no .txt, .jsonl, .json or .parquet file; point --corpus at your "
                f"text files."
            )
        return files
    if path.is_file():
        _check_compression(path if _compressed_unreadably(path) else None)
        if _builder_for(path) is None:
            raise ConfigError(
                f"corpus file {entry} has an unknown type; use .txt, .jsonl, .json or .parquet (optionally "
                f".gz/.xz/.bz2)."
            )
        return [path]
    if entry.startswith((".", "/", "~")) or _builder_for(path):
        raise ConfigError(f"corpus path {entry} does not exist; check the path or pass a datasets hub name.")
    return None


def count_undecodable_lines(path: Path) -> tuple[int, int]:
    """How many lines of a text or JSON-lines file are not valid UTF-8, and how many lines it has."""
    opener = COMPRESSIONS.get(path.suffix, open)
    bad = lines = 0
    with opener(path, "rb") as f:
        for line in f:
            lines += 1
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
    return bad, lines


def is_blank(path: Path) -> bool:
    """Whether a (possibly compressed) file holds nothing but white space; reads only up to its first non-blank line."""
    opener = COMPRESSIONS.get(path.suffix, open)
    with opener(path, "rb") as f:
        return not any(line.strip() for line in f)


@contextmanager
def readers_quiet():
    """datasets' readers log their own error before raising it (a parquet file's "Failed to read schema"); the
    failure becomes one sentence here, so the log line would only say it twice."""
    was = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(was)


def _load_files(files: list[Path], text_column: str, log) -> list[datasets.Dataset]:
    parts = []
    for path in files:
        try:
            with readers_quiet():
                part = _load_file(path, text_column, log)
        except UNREADABLE as err:
            cause = err.__cause__ or err  # datasets wraps the reader's error
            detail = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else ""
            raise ConfigError(
                f"corpus file {path} cannot be read as {_builder_for(path)} ({type(cause).__name__}"
                f"{': ' + detail if detail else ''}); fix or remove the file."
            ) from None
        if part is not None:
            parts.append(part)
    return parts


def _load_file(path: Path, text_column: str, log) -> datasets.Dataset | None:
    """One corpus file as a Dataset of its text column named `text` (None: a blank file, skipped)."""
    builder = _builder_for(path)
    if builder in ("text", "json") and is_blank(path):
        log(f"corpus file {path} is empty; skipped")
        return None
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:
        if not isinstance(err.__cause__, UnicodeDecodeError):
            raise
        _check_undecodable(path, builder, log)
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", encoding_errors="replace", **kwargs)
    column = "text" if builder == "text" else text_column
    if column not in ds.column_names:
        raise ConfigError(
            f"corpus file {path} has no column {text_column!r} (it has {ds.column_names}); pass --text_column."
        )
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        _check_mixed_column(path, column, ds[column])
        raise ConfigError(
            f"corpus file {path}: column {column!r} holds {feature}, not text; pass --text_column naming a column "
            "of strings."
        )
    if builder == "json" and not _valid_utf8(ds.data.column(column)):
        _check_undecodable(path, builder, log)  # Arrow's JSON reader keeps bytes that are not UTF-8 as they are
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _valid_utf8(column: pyarrow.ChunkedArray) -> bool:
    """Whether every string of a column is valid UTF-8, checked by Arrow in C++ (no Python pass over the rows)."""
    try:
        column.validate(full=True)
    except pyarrow.ArrowInvalid:
        return False
    return True


def _check_undecodable(path: Path, builder: str, log) -> None:
    """A file found not to be UTF-8: refuse a JSON-lines file or a text file mostly not text; a text file with some
    such lines is read with U+FFFD in their place, and the count said. Only such files pay this second reading."""
    bad, lines = count_undecodable_lines(path)
    if builder == "json" or bad > lines // 2:
        raise ConfigError(
            f"corpus file {path} has {bad} of {lines} lines that are not valid UTF-8"
            + (" (it is not text)" if bad > lines // 2 else "")
            + "; re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out."
        )
    log(f"corpus file {path}: {bad} of {lines} lines are not valid UTF-8 and were decoded with U+FFFD replacement "
        "characters")  # fmt: skip


def _check_mixed_column(path: Path, column: str, values: list) -> None:
    """A column of strings with some rows of another type (a number, a list): name those rows, which is what the
    user has to fix, rather than the type datasets inferred for the whole column."""
    rows = rows_not_text(values)
    if rows and any(isinstance(v, str) for v in values):
        raise ConfigError(
            f"corpus file {path}: column {column!r} holds text except in {rows}; make those rows strings or drop them."
        )


def rows_not_text(values: list) -> str | None:
    """The rows of `values` that hold no string, numbered from 1 and saying what they hold ("rows 4, 8 (int
    there)"), or None when every row is a string."""
    others = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if not others:
        return None
    shown = ", ".join(str(i + 1) for i in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    first = values[others[0]]
    held = "nothing" if first is None else type(first).__name__
    return f"row{'s' if len(others) > 1 else ''} {shown} ({held} there)"


def _load_hub(name: str, text_column: str) -> datasets.Dataset:
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split="train")
    except Exception as err:  # the hub raises many types; the user needs one sentence
        raise ConfigError(
            f"corpus {name!r} is neither an existing path nor a loadable datasets hub name "
            f"({type(err).__name__}); check the spelling or the network."
        ) from None
    if text_column not in ds.column_names:
        raise ConfigError(
            f"corpus {name} has no column {text_column!r} (it has {ds.column_names}); pass --text_column."
        )
    return (
        ds.select_columns([text_column]).rename_column(text_column, "text")
        if text_column != "text"
        else ds.select_columns(["text"])
    )


def load_corpus(entries: Iterable[str], text_column: str = "text", log=print) -> datasets.Dataset:
    """All entries as one Dataset of non-empty documents in column `text`."""
    parts, seen = [], {}
    for entry in entries:
        files = _expand(entry)
        for path in files or []:
            first = seen.get(path.resolve())
            seen[path.resolve()] = entry
            if first is not None:
                raise ConfigError(
                    f"--corpus names {path} twice ({first} and {entry}), which would count its words twice; name "
                    "each file once."
                )
        parts.extend(_load_files(files, text_column, log) if files is not None else [_load_hub(entry, text_column)])
    ds = datasets.concatenate_datasets(parts) if parts else None
    if ds is not None:
        ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if ds is None or len(ds) == 0:
        raise ConfigError(f"corpus {', '.join(entries)} holds no text; point --corpus at non-empty files.")
    return ds


def corpus_fingerprint(entries: Iterable[str], memo: Path) -> str:
    """A key of what the corpus holds, not where it lies: each local file's name inside its folder (a file named
    directly: its suffixes, which say how it is read) and the sha256 of its bytes, or the hub name. A file's digest is
    kept in `memo` under its path, size, mtime and inode, so each version of a file is read once."""
    digest = hashlib.sha256()
    for entry in entries:
        files = _expand(entry)
        if files is None:
            digest.update(f"hub:{entry}".encode())
            continue
        root = Path(entry).expanduser()
        for path in files:
            name = str(path.relative_to(root)) if root.is_dir() else "".join(path.suffixes)
            digest.update(f"{name}:{content_digest(path, memo)};".encode())
    return digest.hexdigest()[:16]


def content_digest(path: Path, memo: Path) -> str:
    """sha256 of the file's bytes, read once per version of the file (its path, size, mtime and inode) and kept in
    `memo`."""
    st = path.stat()
    version = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode()).hexdigest()
    kept = memo / version[:32]
    if kept.is_file():
        return kept.read_text()
    with open(path, "rb") as f:
        value = hashlib.file_digest(f, "sha256").hexdigest()
    memo.mkdir(parents=True, exist_ok=True)
    staging = kept.with_name(f"{kept.name}.tmp-{os.getpid()}")
    staging.write_text(value)
    staging.rename(kept)  # whole or not at all: another rank may read it at once
    return value
