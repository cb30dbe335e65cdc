"""Feeding the step: this rank's micro-batches of every global batch, and its share of the held-out set.

The sampler says which samples a step trains on, the collator masks and pads them, the prefetcher collates ahead in a
worker process where an accelerator computes, and the batches arrive on this rank's device.
"""

from __future__ import annotations

from tnf_scale.config import RunConfig
from tnf_scale.data.batch import Batch
from tnf_scale.data.collate import EVAL_EPOCH, Collator
from tnf_scale.data.prefetch import StepPrefetcher
from tnf_scale.data.sampler import GlobalBatchSampler, local_share
from tnf_scale.distributed import Topology


class StepFeeder:
    """Batches for one data-parallel rank, on its device.

    `pad_eval` grows a short last held-out micro-batch to the micro-batch size, with rows that predict nothing and
    read nothing (DeepSpeed's pipeline schedule needs equal micro-batches).
    """

    def __init__(
        self, cfg: RunConfig, world: Topology, train_set, eval_set, collator: Collator, pad_eval: bool = False
    ):
        self.micro_batch_size, self.eval_sequences, self.pad_eval = cfg.micro_batch_size, cfg.eval_sequences, pad_eval
        self.device, self.data_rank, self.data_size = world.device, world.data_parallel_rank, world.data_parallel_size
        self.train_set, self.eval_set, self.collator = train_set, eval_set, collator
        self.sampler = GlobalBatchSampler(len(train_set), cfg.global_batch_size, cfg.seed)
        on_accelerator = world.device.type != "cpu"
        ahead = cfg.prefetch == "on" or (cfg.prefetch == "auto" and on_accelerator)
        # page-locked batches reach an accelerator without blocking the step
        self.prefetcher = StepPrefetcher(self._collate_step, ahead=ahead, pin=ahead and on_accelerator)

    def _micro_batches(self, dataset, indices: list[int], keys: list[int], epochs: list[int]) -> list[Batch]:
        """Collated micro-batches, on the host."""
        mb = self.micro_batch_size
        return [
            self.collator(dataset, indices[i : i + mb], keys[i : i + mb], epochs[i : i + mb])
            for i in range(0, len(indices), mb)
        ]

    def _collate_step(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global batch `step`, on the host (the prefetcher's worker runs it)."""
        indices, keys, epochs = self.sampler.step(step)
        share = (local_share(x, self.data_rank, self.data_size) for x in (indices, keys, epochs))
        return self._micro_batches(self.train_set, *share)

    def train_batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches of global batch `step`, on its device. With prefetching they were collated (and
        page-locked on an accelerator) while the previous step ran."""
        return [b.to(self.device, non_blocking=self.prefetcher.pin) for b in self.prefetcher.get(step)]

    def eval_batches(self) -> list[Batch]:
        """This rank's share of the held-out set: the first --eval_sequences, whatever the ranks and stages, in as
        many micro-batches on every replica (a shorter share ends with micro-batches that score nothing)."""
        size = min(len(self.eval_set), self.eval_sequences)  # at least one per replica: startup.check_eval_split
        mine = local_share(list(range(size)), self.data_rank, self.data_size)
        batches = [b.to(self.device) for b in self._micro_batches(self.eval_set, mine, mine, [EVAL_EPOCH] * len(mine))]
        longest_share = -(-size // self.data_size)
        batches += [batches[-1].emptied()] * (-(-longest_share // self.micro_batch_size) - len(batches))
        return [b.padded(self.micro_batch_size) for b in batches] if self.pad_eval else batches

    def close(self) -> None:
        """End the prefetching worker, if one runs."""
        self.prefetcher.close()
