"""Where the gap to the Hugging Face Trainer comes from: one micro-batch's forward + backward, three ways.

    python tools/peer_gap.py --preset bert-base --micro_batch_size 16 --repeats 3

Times (median of --repeats, after one warm-up) on a freshly initialised model of the preset's shape:
  stock   BertForMaskedLM(input_ids, labels=...): the MLM head and cross-entropy at every position (the peer's model)
  ours    MaskedLMObjective: the head at the masked positions only (train.py's model)
  encoder the encoder alone, its output summed: what neither can avoid
and prints the split: head and cross-entropy at the unmasked positions (stock - ours), the head at the masked
ones (ours - encoder), and the rest.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import BertForMaskedLM

from tnf_scale.config import PRESETS, resolve
from tnf_scale.data.batch import IGNORE_INDEX
from tnf_scale.errors import CommandParser
from tnf_scale.model.objective import MaskedLMObjective
from tnf_scale.model.tnf_bert import bert_config


def timed(step, repeats: int) -> float:
    step()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bert-base", choices=list(PRESETS))
    parser.add_argument("--micro_batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cfg = resolve(args.preset, {})
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(cfg, cfg.vocab_size))
    objective = MaskedLMObjective(model)
    ids = torch.randint(1000, cfg.vocab_size, (args.micro_batch_size, cfg.max_seq_len))
    mask = torch.ones_like(ids)
    labels = torch.where(torch.rand(ids.shape) < cfg.mlm_probability, ids, IGNORE_INDEX)
    predicted = torch.nonzero(labels.flatten() != IGNORE_INDEX).flatten()  # as the collator gives it

    def stock():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()

    def ours():
        model.zero_grad(set_to_none=True)
        objective(ids, mask, labels, predicted)[0].mean().backward()

    def encoder():
        model.zero_grad(set_to_none=True)
        model.bert(input_ids=ids, attention_mask=mask)[0].sum().backward()

    times = {name: timed(step, args.repeats) for name, step in (("stock", stock), ("ours", ours), ("encoder", encoder))}
    print(
        f"{args.preset}, micro-batch {args.micro_batch_size} x {cfg.max_seq_len}, {torch.get_num_threads()} threads; "
        f"forward + backward, median of {args.repeats}:"
    )
    for name, seconds in times.items():
        print(f"  {name:8s} {seconds * 1000:9.1f} ms")
    print(
        f"  head + cross-entropy at unmasked positions (stock - ours): "
        f"{(times['stock'] - times['ours']) * 1000:.1f} ms "
        f"({100 * (times['stock'] / times['ours'] - 1):.1f}% on top of ours)"
    )
    print(f"  head at masked positions (ours - encoder): {(times['ours'] - times['encoder']) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
