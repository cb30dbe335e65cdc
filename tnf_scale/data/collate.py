"""Collation: dataset rows -> a masked, padded Batch (docs/design.md: "Global batch and order", "Read").

A sample's MLM mask is drawn from a generator seeded by (seed, epoch, order key), so it is the same whichever rank,
micro-batch or position in a micro-batch holds it. A rare occurrence whose span holds a token selected for
prediction reads no note (the note would give the masked word away); it still writes one.
"""

from __future__ import annotations

import datasets
import torch
from transformers import PreTrainedTokenizerFast

from tnf_scale.data.batch import IGNORE_INDEX, Batch
from tnf_scale.data.tokenizer import continuation_table
from tnf_scale.seeding import seeded_generator
from tnf_scale.spans import expand_spans, span_positions, spans_holding

EVAL_EPOCH = 2**32 - 1  # masks of held-out sequences come from a stream no training epoch uses


class Collator:
    """Turns dataset rows into a masked, padded Batch.

    `notes_at_masked` is the leaky ablation: occurrences read their note even where a token of
    their span is to be predicted. With `whole_word_masking` the tokens to predict are chosen by whole words (a word is
    a token and the WordPiece continuations after it): each word is chosen with the masking probability, so that share
    of the tokens is chosen, and a rare word is predicted whole or not at all.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        max_seq_len: int,
        mlm_probability: float,
        seed: int,
        notes_at_masked: bool = False,
        whole_word_masking: bool = False,
    ):
        self.seq_len, self.prob, self.seed, self.notes_at_masked = max_seq_len, mlm_probability, seed, notes_at_masked
        self.pad_id, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)
        self.continues = torch.from_numpy(continuation_table(tokenizer)) if whole_word_masking else None

    def mask(self, ids: torch.Tensor, epoch: int, order_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BERT masking of one sample: 15% of non-special tokens (or of whole words); of those 80% [MASK], 10% random,
        10% kept. Also one uniform per token, drawn after the mask from the same generator, for ELECTRA's replacement
        sampling."""
        g = seeded_generator(self.seed, epoch, order_key)  # the same wherever the sample sits
        if self.continues is None:
            drawn = torch.rand(len(ids), generator=g)
        else:  # one draw per word, given to each of its tokens
            word = torch.cumsum(~self.continues[ids], 0) - 1
            drawn = torch.rand(int(word[-1]) + 1, generator=g)[word]
        chosen = (drawn < self.prob) & ~torch.isin(ids, self.special)
        action = torch.rand(len(ids), generator=g)
        random_tokens = torch.randint(self.vocab_size, (len(ids),), generator=g)
        inputs = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        return inputs, torch.where(chosen, ids, IGNORE_INDEX), torch.rand(len(ids), generator=g)

    def __call__(
        self, dataset: datasets.Dataset, indices: list[int], order_keys: list[int], epochs: list[int]
    ) -> Batch:
        rows = dataset[indices]
        b = len(indices)
        input_ids = torch.full((b, self.seq_len), self.pad_id, dtype=torch.int64)
        labels = torch.full((b, self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        lengths = torch.zeros(b, dtype=torch.int64)
        uniform = torch.zeros(b, self.seq_len)
        occ = {"sample": [], "rare": [], "start": [], "end": []}
        for i in range(b):
            ids = torch.as_tensor(rows["input_ids"][i], dtype=torch.int64)
            inputs, lab, uniform[i, : len(ids)] = self.mask(ids, epochs[i], order_keys[i])
            input_ids[i, : len(ids)], labels[i, : len(ids)], lengths[i] = inputs, lab, len(ids)
            rare = torch.as_tensor(rows["rare_ids"][i], dtype=torch.int64)
            occ["sample"].append(torch.full_like(rare, i))
            occ["rare"].append(rare)
            occ["start"].append(torch.as_tensor(rows["span_start"][i], dtype=torch.int64))
            occ["end"].append(torch.as_tensor(rows["span_end"][i], dtype=torch.int64))
        attention_mask = (torch.arange(self.seq_len)[None, :] < lengths[:, None]).long()
        cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64) for k, v in occ.items()}
        spans = (cat["sample"], cat["start"], cat["end"])
        reads = (
            torch.ones_like(cat["rare"], dtype=torch.bool)
            if self.notes_at_masked
            else ~spans_holding(labels != IGNORE_INDEX, *spans)
        )
        read_index = torch.nonzero(reads).flatten()
        return Batch(
            input_ids,
            attention_mask,
            labels,
            lengths,
            torch.as_tensor(order_keys, dtype=torch.int64),
            cat["sample"],
            cat["rare"],
            cat["start"],
            cat["end"],
            reads,
            span_positions(*spans, (b, self.seq_len)),
            uniform,
            read_index,
            torch.nonzero(labels.flatten() != IGNORE_INDEX).flatten(),
            torch.nonzero(attention_mask.flatten()).flatten(),
            *expand_spans(*(span[read_index] for span in spans), self.seq_len),
        )
