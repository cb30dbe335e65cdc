"""Pack encoded document groups (`encoding.encode_corpus`) into fixed-length sequences that carry rare-word occurrences.

Each group's stream (its documents in order, each closed by [SEP]) is cut into sequences of `max_seq_len - 2` tokens
plus [CLS] ... [SEP]. A cut moves back to the nearest word start, so no word is split unless it alone is longer than a
sequence; a word that is split gets no occurrence (docs/design.md, "Words and rare words"). An occurrence is
`(rare id, start, end)` with the inclusive token span in sequence positions ([CLS] is position 0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerFast

from tnf_scale.data.encoding import derived_fingerprint, list_array, word_keys, word_spans


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


def make_packer(
    tokenizer: PreTrainedTokenizerFast, rare_keys: pa.BinaryArray, max_seq_len: int
) -> Callable[[pa.Table], pa.Table]:
    """A `datasets.map` function over encoded rows in Arrow format, batched with batch_size=1: one row -> its packed
    sequences. `rare_keys[r]` is the key of rare id r."""
    cls_id, sep_id, unk_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id
    content_len = max_seq_len - 2

    def pack(row: pa.Table) -> pa.Table:
        ids = row.column("input_ids").combine_chunks().flatten().to_numpy()
        word_start = row.column("word_start").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        unk_words = row.column("unk_words").combine_chunks().flatten().to_pylist()
        first, last = word_spans(word_start)
        rare = pc.index_in(word_keys(ids, first, unk_id, unk_words), value_set=rare_keys).fill_null(-1).to_numpy()
        occurs = rare >= 0
        occ_first, occ_last, occ_rare = first[occurs], last[occurs], rare[occurs]

        cuts = np.asarray(cut_points(word_start, len(ids), content_len))
        seq_start, seq_end = cuts[:-1], cuts[1:]
        # [CLS] tokens [SEP] for each sequence, laid end to end
        offsets = np.concatenate(([0], np.cumsum(seq_end - seq_start + 2)))
        tokens = np.empty(offsets[-1], dtype=np.int32)
        content = np.ones(offsets[-1], dtype=bool)
        content[offsets[:-1]] = content[offsets[1:] - 1] = False
        tokens[offsets[:-1]], tokens[offsets[1:] - 1], tokens[content] = cls_id, sep_id, ids
        # each occurrence in the sequence its first token falls in, unless the sequence ends inside it
        sequence = np.searchsorted(seq_start, occ_first, side="right") - 1
        kept = occ_last < seq_end[sequence]
        sequence, occ_first, occ_last, occ_rare = sequence[kept], occ_first[kept], occ_last[kept], occ_rare[kept]
        occ_offsets = np.concatenate(([0], np.cumsum(np.bincount(sequence, minlength=len(seq_start)))))
        return pa.table(
            {
                "input_ids": list_array(offsets, tokens),
                "rare_ids": list_array(occ_offsets, occ_rare, pa.int32()),
                "span_start": list_array(occ_offsets, occ_first - seq_start[sequence] + 1, pa.int32()),
                "span_end": list_array(occ_offsets, occ_last - seq_start[sequence] + 1, pa.int32()),
            }
        )

    return pack


def pack_corpus(
    encoded: datasets.Dataset,
    tokenizer: PreTrainedTokenizerFast,
    rare_keys: pa.BinaryArray,
    max_seq_len: int,
    num_proc: int,
    scratch: Path,
) -> datasets.Dataset:
    """Every encoded group packed, in order, by `num_proc` processes, written under `scratch`; the output does not
    depend on `num_proc`."""
    pack = make_packer(tokenizer, rare_keys, max_seq_len)
    return (
        encoded.with_format("arrow")
        .map(
            pack,
            batched=True,
            batch_size=1,
            remove_columns=encoded.column_names,
            num_proc=min(num_proc, len(encoded)) if num_proc > 1 else None,
            desc="packing sequences",
            cache_file_name=str(scratch / "packed.arrow"),
            new_fingerprint=derived_fingerprint(encoded, f"packed-{max_seq_len}"),
        )
        .with_format(None)
    )
