"""One pass of the Rust tokenizer over the corpus: each group of GROUP documents becomes one row holding its token
stream, where each word starts, and how often each of its words occurs. Counting and packing both read these rows,
so no text is tokenized twice and no Python object is made per word.

A word (TNF_SPEC section 1) is identified by a *key*: the little-endian int32 bytes of its WordPiece ids. The pieces
of a WordPiece tokenizer spell the normalized word, so two words share a key only when they are the same word. A word
the vocabulary cannot spell ([UNK]) is keyed by its text instead, behind the id -1, which no vocabulary has.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from tnf_scale.data.rare_vocab import word_splitter

GROUP = 256  # documents encoded, and later packed, as one stream: the rows do not depend on the processes
TEXT_KEY_TAG = np.int32(-1).tobytes()


def word_keys(ids: np.ndarray, word_start: np.ndarray, unk_id: int, unk_words: list[str]) -> pa.BinaryArray:
    """The key of every word of a token stream, in order; `unk_words` are the texts of the words holding `unk_id`."""
    starts = np.flatnonzero(word_start)
    offsets = (np.append(starts, len(ids)) * 4).astype(np.int32)
    data = np.ascontiguousarray(ids, dtype="<i4")
    keys = pa.Array.from_buffers(pa.binary(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    if not unk_words:
        return keys
    holds_unk = np.logical_or.reduceat(ids == unk_id, starts)
    return pc.replace_with_mask(keys, pa.array(holds_unk), pa.array([TEXT_KEY_TAG + w.encode() for w in unk_words], pa.binary()))


def word_of_key(key: bytes, tokenizer: PreTrainedTokenizerFast) -> str:
    """The normalized word a key stands for."""
    if key.startswith(TEXT_KEY_TAG):
        return key[len(TEXT_KEY_TAG):].decode()
    pieces = tokenizer.convert_ids_to_tokens(np.frombuffer(key, dtype="<i4").tolist())
    prefix = tokenizer.backend_tokenizer.model.continuing_subword_prefix
    return pieces[0] + "".join(piece.removeprefix(prefix) for piece in pieces[1:])


def _list_column(values, type: pa.DataType | None = None) -> pa.ListArray:
    """One list (one row) holding `values`."""
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), pa.array(values, type))


def make_encoder(tokenizer: PreTrainedTokenizerFast) -> Callable[[dict], pa.Table]:
    """A `datasets.map` function, batched with batch_size=1: a row {"texts": [GROUP documents]} -> one row with
    `input_ids` (the documents' tokens, each document closed by [SEP]), `word_start`, `unk_words` and the row's word
    counts (`keys`, `counts`; separators and other special tokens are not words)."""
    split = word_splitter(tokenizer)
    sep_id, unk_id = tokenizer.sep_token_id, tokenizer.unk_token_id
    not_words = np.asarray(sorted(set(tokenizer.all_special_ids) - {unk_id}), dtype=np.int32)

    def encode(batch: dict) -> pa.Table:
        texts = batch["texts"][0]
        encodings = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                              verbose=False).encodings
        ids_parts, word_parts, unk_words = [], [], []
        for document, (text, encoding) in enumerate(zip(texts, encodings)):
            ids_parts += [encoding.ids, [sep_id]]
            word_parts += [encoding.word_ids, [-1 - document]]  # a separator is a word of its own
            if unk_id in encoding.ids:
                unk_words += _unknown_words(text, encoding, unk_id, split)
        ids = np.concatenate([np.asarray(part, dtype=np.int32) for part in ids_parts])
        word = np.concatenate([np.asarray(part, dtype=np.int64) for part in word_parts])
        word_start = np.ones(len(word), dtype=bool)
        word_start[1:] = word[1:] != word[:-1]
        keys = word_keys(ids, word_start, unk_id, unk_words)
        starts = np.flatnonzero(word_start)
        lengths = np.diff(np.append(starts, len(ids)))
        is_word = ~((lengths == 1) & np.isin(ids[starts], not_words))
        counts = pa.table({"key": keys.filter(pa.array(is_word))}).group_by("key").aggregate([("key", "count")])
        return pa.table({
            "input_ids": _list_column(ids), "word_start": _list_column(word_start),
            "unk_words": _list_column(unk_words, pa.string()),  # typed: most rows have none
            "keys": pa.ListArray.from_arrays(pa.array([0, counts.num_rows], pa.int32()), counts.column("key").combine_chunks()),
            "counts": _list_column(counts.column("key_count").to_numpy()),
        })

    return encode


def _unknown_words(text: str, encoding, unk_id: int, split: Callable[[str], list[str]]) -> list[str]:
    """The normalized text of each word of one document that holds the unknown token, in order."""
    words, last_word = [], None
    for token, (token_id, word) in enumerate(zip(encoding.ids, encoding.word_ids)):
        if token_id == unk_id and word != last_word:
            start, end = encoding.word_to_chars(word)
            words.append("".join(split(text[start:end])))
            last_word = word
    return words


def encode_corpus(corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, num_proc: int, scratch: Path) -> datasets.Dataset:
    """The corpus as rows of GROUP encoded documents (see `make_encoder`), by `num_proc` processes, written under
    `scratch`."""
    groups = corpus.map(lambda batch: {"texts": [batch["text"]]}, batched=True, batch_size=GROUP,
                        remove_columns=corpus.column_names, desc="grouping documents",
                        cache_file_name=str(scratch / "groups.arrow"))
    return groups.map(make_encoder(tokenizer), batched=True, batch_size=1, remove_columns=["texts"],
                      num_proc=min(num_proc, len(groups)) if num_proc > 1 else None, desc="encoding and counting words",
                      cache_file_name=str(scratch / "encoded.arrow"))
