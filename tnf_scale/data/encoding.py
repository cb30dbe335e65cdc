"""One pass of the Rust tokenizer over the corpus: each group of GROUP documents becomes one row holding its token
stream, where each word starts, and how often each of its words occurs. Counting and packing both read these rows,
so no text is tokenized twice and no Python object is made per word.

A word (docs/design.md, "Words and rare words") is identified by a *key*: the little-endian int32 bytes of its
WordPiece ids. The pieces of a WordPiece tokenizer spell the normalized word, so two words share a key only when they
are the same word. A word the vocabulary cannot spell ([UNK]) is keyed by its text instead, behind the id -1, which
no vocabulary has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from tnf_scale.data.rare_vocab import word_splitter
from tnf_scale.data.tokenizer import continuation_table

GROUP = 256  # documents encoded, and later packed, as one stream: the rows do not depend on the processes
TEXT_KEY_TAG = np.int32(-1).tobytes()


def word_spans(word_start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last token of every word of a token stream, in order."""
    first = np.flatnonzero(word_start)
    return first, np.append(first[1:], len(word_start)) - 1


def word_keys(ids: np.ndarray, first: np.ndarray, unk_id: int, unk_words: list[str]) -> pa.BinaryArray:
    """The key of every word of a token stream whose words start at tokens `first`; `unk_words` are the texts of the
    words holding `unk_id`."""
    offsets = (np.append(first, len(ids)) * 4).astype(np.int32)
    data = np.ascontiguousarray(ids, dtype="<i4")
    keys = pa.Array.from_buffers(pa.binary(), len(first), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    if not unk_words:
        return keys
    holds_unk = np.logical_or.reduceat(ids == unk_id, first)
    return pc.replace_with_mask(
        keys, pa.array(holds_unk), pa.array([TEXT_KEY_TAG + w.encode() for w in unk_words], pa.binary())
    )


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list:
    """The Rust batch encoder's `Encoding` of each text, without special tokens, truncation or padding, and without
    the character offsets nothing here reads (tracking them costs the encoder about 40% more here; such an Encoding
    holds no word ids either: `word_start` reads words from the pieces). Called directly: transformers' wrapper would
    also build a Python dict per text that nothing reads."""
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:  # as transformers' own call with truncation=False does
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    return backend.encode_batch_fast(texts, add_special_tokens=False)


def word_of_key(key: bytes, tokenizer: PreTrainedTokenizerFast) -> str:
    """The normalized word a key stands for."""
    if key.startswith(TEXT_KEY_TAG):
        return key[len(TEXT_KEY_TAG) :].decode()
    pieces = tokenizer.convert_ids_to_tokens(np.frombuffer(key, dtype="<i4").tolist())
    prefix = tokenizer.backend_tokenizer.model.continuing_subword_prefix
    return pieces[0] + "".join(piece.removeprefix(prefix) for piece in pieces[1:])


def list_array(offsets, values, type: pa.DataType | None = None) -> pa.ListArray:
    """Lists laid end to end: list i holds values[offsets[i]:offsets[i + 1]]."""
    values = values if isinstance(values, pa.Array) else pa.array(values, type)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def make_encoder(tokenizer: PreTrainedTokenizerFast) -> Callable[[dict], pa.Table]:
    """A `datasets.map` function, batched with batch_size=1: a row {"texts": [GROUP documents]} -> one row with
    `input_ids` (the documents' tokens, each document closed by [SEP]), `word_start`, `unk_words` and the row's word
    counts (`keys`, `counts`; separators and other special tokens are not words). A word starts at every token that
    is not a WordPiece continuation (`continuation_table`), as the pre-tokenizer's words do; a separator, never a
    continuation, is a word of its own."""
    split = word_splitter(tokenizer)
    sep_id, unk_id = tokenizer.sep_token_id, tokenizer.unk_token_id
    not_words = np.asarray(sorted(set(tokenizer.all_special_ids) - {unk_id}), dtype=np.int32)
    starts_a_word = ~continuation_table(tokenizer)

    def encode(batch: dict) -> pa.Table:
        texts = batch["texts"][0]
        ids_parts, unk_words = [], []
        for text, encoding in zip(texts, encode_texts(tokenizer, texts)):
            ids = encoding.ids  # a new Python list at every reading: read once
            ids_parts += [ids, [sep_id]]
            if unk_id in ids:
                unk_words += _unknown_words(text, tokenizer, unk_id, split)
        ids = np.fromiter(chain.from_iterable(ids_parts), dtype=np.int32)
        word_start = starts_a_word[ids]
        first, last = word_spans(word_start)
        keys = word_keys(ids, first, unk_id, unk_words)
        is_word = ~((first == last) & np.isin(ids[first], not_words))
        counts = pa.table({"key": keys.filter(pa.array(is_word))}).group_by("key").aggregate([("key", "count")])
        one_row = [0, len(ids)]
        return pa.table(
            {
                "input_ids": list_array(one_row, ids),
                "word_start": list_array(one_row, word_start),
                "unk_words": list_array([0, len(unk_words)], unk_words, pa.string()),  # typed: most rows have none
                "keys": list_array([0, counts.num_rows], counts.column("key").combine_chunks()),
                "counts": list_array([0, counts.num_rows], counts.column("key_count").combine_chunks()),
            }
        )

    return encode


def _unknown_words(
    text: str, tokenizer: PreTrainedTokenizerFast, unk_id: int, split: Callable[[str], list[str]]
) -> list[str]:
    """The normalized text of each word of one document that holds the unknown token, in order (the document encoded
    again, with the offsets that find a word's characters: few documents hold an unknown word)."""
    encoding = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    words, last_word = [], None
    for token_id, word in zip(encoding.ids, encoding.word_ids):
        if token_id == unk_id and word != last_word:
            start, end = encoding.word_to_chars(word)
            words.append("".join(split(text[start:end])))
            last_word = word
    return words


def derived_fingerprint(dataset: datasets.Dataset, step: str) -> str:
    """A fingerprint for `step` applied to `dataset`, given to `datasets.map` so that it does not hash the mapped
    function (about 0.7 s a map here: the closure holds the tokenizer). Preparation maps into a fresh scratch folder
    with its own file name, and the entry's key already hashes the tokenizer, so no cache is keyed by it."""
    return hashlib.sha256(f"{dataset._fingerprint}:{step}".encode()).hexdigest()[:32]


def group_documents(corpus: datasets.Dataset, path: Path) -> datasets.Dataset:
    """The corpus's texts as rows of GROUP documents (the last row: the rest), written to `path` by Arrow: no Python
    string is made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for batch in corpus.with_format("arrow").iter(batch_size=GROUP):
            texts = batch.column("text").combine_chunks()
            row = pa.table({"texts": pa.ListArray.from_arrays(pa.array([0, len(texts)], pa.int32()), texts)})
            writer = writer or pa.ipc.new_stream(sink, row.schema)
            writer.write_table(row)
        writer.close()
    return datasets.Dataset.from_file(str(path))


def encode_corpus(
    corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, num_proc: int, scratch: Path
) -> datasets.Dataset:
    """The corpus as rows of GROUP encoded documents (see `make_encoder`), by `num_proc` processes, written under
    `scratch`."""
    groups = group_documents(corpus, scratch / "groups.arrow")
    return groups.map(
        make_encoder(tokenizer),
        batched=True,
        batch_size=1,
        remove_columns=["texts"],
        num_proc=min(num_proc, len(groups)) if num_proc > 1 else None,
        desc="encoding and counting words",
        cache_file_name=str(scratch / "encoded.arrow"),
        new_fingerprint=derived_fingerprint(groups, "encoded"),
    )
