"""Global batches, MLM masking and collation (TNF_SPEC section 2).

Step n trains on order positions [n*B, (n+1)*B) of an endless stream that visits the
training set in a fresh seeded permutation every epoch. A sample's order key is its order
position; its MLM mask is drawn from a generator seeded by (seed, epoch, order key), so it is
the same whichever rank, micro-batch or position in a micro-batch holds it.

A rare occurrence whose span holds a token selected for prediction reads no note
(TNF_SPEC section 3: the note would give the masked word away); it still writes one.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from deepspeed.accelerator import get_accelerator
from transformers import PreTrainedTokenizerFast

from tnf_scale.seeding import seeded_generator
from tnf_scale.spans import span_positions, spans_holding

EVAL_EPOCH = 2**32 - 1  # masks of held-out sequences come from a stream no training epoch uses


IGNORE_INDEX = -100  # label of a token not selected for prediction (PyTorch's and Hugging Face's ignore index)


class GlobalBatchSampler:
    """Which samples, in which order, step n trains on: a function of (seed, n, B) and the data size."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        self.num_samples, self.batch, self.seed = num_samples, global_batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.num_samples, generator=seeded_generator(self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def step(self, n: int) -> tuple[list[int], list[int], list[int]]:
        """(dataset indices, order keys, epochs) of the global batch of step n, in order."""
        return self.at(list(range(n * self.batch, (n + 1) * self.batch)))

    def at(self, keys: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(dataset indices, order keys, epochs) of the samples at order positions `keys`."""
        epochs = [k // self.num_samples for k in keys]
        indices = [int(self._permutation(e)[k % self.num_samples]) for k, e in zip(keys, epochs)]
        return indices, keys, epochs


def local_share(items: list, rank: int, world_size: int) -> list:
    """This data-parallel rank's contiguous share of `items`: all of them over the ranks, shares differing by at most one
    (a global batch divides evenly; a held-out set need not)."""
    per_rank, extra = divmod(len(items), world_size)
    start = rank * per_rank + min(rank, extra)
    return items[start : start + per_rank + (rank < extra)]


@dataclass
class Batch:
    """A micro-batch: padded tokens, MLM labels, and the rare occurrences it holds."""

    input_ids: torch.Tensor  # (b, L) int64, masked
    attention_mask: torch.Tensor  # (b, L)
    labels: torch.Tensor  # (b, L), IGNORE_INDEX where not selected for prediction
    lengths: torch.Tensor  # (b,) real (non-padding) length
    order_key: torch.Tensor  # (b,)
    occ_sample: torch.Tensor  # (n,) which row of the micro-batch
    occ_rare: torch.Tensor  # (n,) rare id
    occ_start: torch.Tensor  # (n,) inclusive token span
    occ_end: torch.Tensor
    occ_reads: torch.Tensor  # (n,) bool: the occurrence reads its note (no token of its span is predicted)
    in_rare_span: torch.Tensor  # (b, L) bool: the position lies in a rare occurrence's span
    sample_uniform: torch.Tensor  # (b, L) float: ELECTRA's generator samples a replacement with it (inverse CDF)

    @property
    def occ_order_key(self) -> torch.Tensor:
        return self.order_key[self.occ_sample]

    @property
    def read_spans(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rare id, sample, start, end) of the occurrences that read a note."""
        reads = self.occ_reads
        return self.occ_rare[reads], self.occ_sample[reads], self.occ_start[reads], self.occ_end[reads]

    def padded(self, rows: int) -> Batch:
        """The micro-batch grown to `rows` rows by copies of its first row that predict nothing and hold no occurrence,
        for schedules that need equal micro-batches (DeepSpeed's pipeline)."""
        extra = rows - len(self.input_ids)
        if extra <= 0:
            return self

        def grow(t: torch.Tensor, fill=None) -> torch.Tensor:
            copies = t[:1].expand(extra, *t.shape[1:]).clone()
            return torch.cat([t, copies if fill is None else copies.fill_(fill)])

        return dataclasses.replace(self, input_ids=grow(self.input_ids), attention_mask=grow(self.attention_mask),
                                   labels=grow(self.labels, IGNORE_INDEX), lengths=grow(self.lengths), order_key=grow(self.order_key),
                                   in_rare_span=grow(self.in_rare_span, False), sample_uniform=grow(self.sample_uniform))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """The batch with `fn` applied to every tensor (a device copy, page-locking)."""
        return Batch(*(fn(getattr(self, f)) for f in self.__dataclass_fields__))

    def pin_memory(self) -> Batch:
        """The batch page-locked for the accelerator DeepSpeed runs on, so that copies to it need not block."""
        return self.map(get_accelerator().pin_memory)

    def to(self, device, non_blocking: bool = False) -> Batch:
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))


class Collator:
    """Turns dataset rows into a masked, padded Batch.

    `notes_at_masked` is the leaky ablation: occurrences read their note even where a token of
    their span is to be predicted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, max_seq_len: int, mlm_probability: float, seed: int,
                 notes_at_masked: bool = False):
        self.seq_len, self.prob, self.seed, self.notes_at_masked = max_seq_len, mlm_probability, seed, notes_at_masked
        self.pad_id, self.mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)

    def mask(self, ids: torch.Tensor, epoch: int, order_key: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BERT masking of one sample: 15% of non-special tokens; of those 80% [MASK], 10% random, 10% kept. Also one
        uniform per token, drawn after the mask from the same generator, for ELECTRA's replacement sampling."""
        g = seeded_generator(self.seed, epoch, order_key)  # the same wherever the sample sits
        chosen = (torch.rand(len(ids), generator=g) < self.prob) & ~torch.isin(ids, self.special)
        action = torch.rand(len(ids), generator=g)
        random_tokens = torch.randint(self.vocab_size, (len(ids),), generator=g)
        inputs = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        return inputs, torch.where(chosen, ids, IGNORE_INDEX), torch.rand(len(ids), generator=g)

    def __call__(self, dataset: datasets.Dataset, indices: list[int], order_keys: list[int], epochs: list[int]) -> Batch:
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
        reads = torch.ones_like(cat["rare"], dtype=torch.bool) if self.notes_at_masked else ~spans_holding(labels != IGNORE_INDEX, *spans)
        return Batch(input_ids, attention_mask, labels, lengths, torch.as_tensor(order_keys, dtype=torch.int64),
                     cat["sample"], cat["rare"], cat["start"], cat["end"], reads, span_positions(*spans, (b, self.seq_len)), uniform)
