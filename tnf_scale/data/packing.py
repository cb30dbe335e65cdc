"""Pack tokenized documents into fixed-length sequences that carry rare-word occurrences.

Documents are streamed in order, separated by [SEP], in groups of GROUP documents (the stream restarts at
each group, so the sequences are the same however the groups are spread over processes), and cut into
sequences of `max_seq_len - 2` tokens plus [CLS] ... [SEP]. A cut moves back to the nearest word start,
so no word is split unless it alone is longer than a sequence; a word that is split gets
no occurrence (TNF_SPEC section 1). An occurrence is `(rare id, start, end)` with the
inclusive token span in sequence positions ([CLS] is position 0).
"""
from __future__ import annotations

from collections.abc import Callable

import datasets
import numpy as np
from transformers import PreTrainedTokenizerFast

from tnf_scale.data.rare_vocab import word_splitter

COLUMNS = ("input_ids", "rare_ids", "span_start", "span_end")
GROUP = 256  # documents packed as one stream


def cut_points(word_start: np.ndarray, n_tokens: int, content_len: int) -> list[int]:
    """Sequence boundaries over a token stream: each at most `content_len` apart, at word starts when possible."""
    starts = np.flatnonzero(word_start)
    cuts = [0]
    while n_tokens - cuts[-1] > content_len:
        limit = cuts[-1] + content_len
        j = np.searchsorted(starts, limit, side="right") - 1  # last word start <= limit
        cuts.append(int(starts[j]) if j >= 0 and starts[j] > cuts[-1] else limit)
    cuts.append(n_tokens)
    return cuts


def make_packer(tokenizer: PreTrainedTokenizerFast, rare_id_of: dict[str, int], max_seq_len: int) -> Callable[[dict], dict]:
    """A batched `datasets.map` function: {"text": [...]} -> packed sequences with occurrences."""
    split = word_splitter(tokenizer)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    content_len = max_seq_len - 2

    def pack(batch: dict) -> dict:
        texts = batch["text"]
        encodings = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        ids_parts, word_parts, rare_of_word = [], [], []
        next_word = 0
        for i, text in enumerate(texts):
            ids = np.asarray(encodings["input_ids"][i], dtype=np.int64)
            local = np.asarray(encodings.word_ids(i), dtype=np.int64)
            words = split(text)
            rare_of_word.extend(rare_id_of.get(w, -1) for w in words)
            rare_of_word.append(-1)  # the [SEP] closing the document is a word of its own
            ids_parts += [ids, np.asarray([sep_id])]
            word_parts += [local + next_word, np.asarray([next_word + len(words)])]
            next_word += len(words) + 1
        ids = np.concatenate(ids_parts)
        word = np.concatenate(word_parts)
        rare = np.asarray(rare_of_word, dtype=np.int64)
        word_start = np.ones(len(word), dtype=bool)
        word_start[1:] = word[1:] != word[:-1]
        # Token extent of every word in the stream, and its rare id.
        positions = np.arange(len(word))
        first = np.full(next_word, len(word), dtype=np.int64)
        last = np.full(next_word, -1, dtype=np.int64)
        np.minimum.at(first, word, positions)
        np.maximum.at(last, word, positions)
        occ_words = np.flatnonzero((last >= 0) & (rare >= 0))
        occ_first, occ_last, occ_rare = first[occ_words], last[occ_words], rare[occ_words]

        out = {name: [] for name in COLUMNS}
        cuts = cut_points(word_start, len(ids), content_len)
        for a, b in zip(cuts[:-1], cuts[1:]):
            out["input_ids"].append(np.concatenate(([cls_id], ids[a:b], [sep_id])).astype(np.int32))
            inside = (occ_first >= a) & (occ_last < b)
            out["rare_ids"].append(occ_rare[inside].astype(np.int32))
            out["span_start"].append((occ_first[inside] - a + 1).astype(np.int32))
            out["span_end"].append((occ_last[inside] - a + 1).astype(np.int32))
        return out

    return pack


def pack_corpus(corpus: datasets.Dataset, tokenizer: PreTrainedTokenizerFast, rare_id_of: dict[str, int], max_seq_len: int,
                num_proc: int = 1) -> datasets.Dataset:
    """Every document packed, in order, by `num_proc` processes. The map runs over rows of GROUP documents, so
    processes split the work at group boundaries and the output does not depend on `num_proc`."""
    groups = corpus.map(lambda batch: {"texts": [batch["text"]]}, batched=True, batch_size=GROUP,
                        remove_columns=corpus.column_names, desc="grouping documents")
    pack = make_packer(tokenizer, rare_id_of, max_seq_len)
    return groups.map(lambda row: pack({"text": row["texts"][0]}), batched=True, batch_size=1, remove_columns=["texts"],
                      num_proc=min(num_proc, len(groups)) if num_proc > 1 else None, desc="packing sequences")
