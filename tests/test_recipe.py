"""BERT's recipe details: whole-word masking, no weight decay on biases and LayerNorm weights, the learning-rate
schedules with a minimum."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime import lr_schedules

from tnf_scale.config import RunConfig
from tnf_scale.data.batch import IGNORE_INDEX
from tnf_scale.data.collate import Collator
from tnf_scale.data.tokenizer import continuation_table
from tnf_scale.ds_config import build_ds_config
from tnf_scale.model.build import build_objective
from tnf_scale.model.param_groups import parameter_groups


def test_whole_word_masking_chooses_every_piece_of_a_word_and_15_percent_of_the_tokens(prepared):
    """Every word (a token and the WordPiece continuations after it) is predicted whole or not at all, rare words
    among them, and 15% of the tokens are chosen: within 0.01 over the 64,000-odd tokens of 1,000 sequences (about 4
    standard deviations of the per-word draw) (planted: a draw per token breaks the first)."""
    n = 1000
    batch = Collator(prepared.tokenizer, 64, 0.15, seed=5, whole_word_masking=True)(
        prepared.train, list(range(n)), list(range(n)), [0] * n
    )
    continues = torch.from_numpy(continuation_table(prepared.tokenizer))
    special = torch.tensor(sorted(set(prepared.tokenizer.all_special_ids)))
    chosen = batch.labels != IGNORE_INDEX
    ids = torch.where(chosen, batch.labels, batch.input_ids)  # the original tokens
    real = batch.attention_mask.bool() & ~torch.isin(ids, special)
    continuation = continues[ids] & real
    assert int(continuation.sum()) > 1000  # the data has words of several pieces
    # a continuation is chosen exactly when the piece before it is
    assert torch.equal(chosen[:, 1:][continuation[:, 1:]], chosen[:, :-1][continuation[:, 1:]])
    spans = zip(batch.occ_sample.tolist(), batch.occ_start.tolist(), batch.occ_end.tolist())
    rare_chosen = [chosen[s, a : b + 1] for s, a, b in spans]
    assert all(bool(c.all()) or not bool(c.any()) for c in rare_chosen)
    assert sum(bool(c.all()) for c in rare_chosen) > 10
    assert float(chosen.sum() / real.sum()) == pytest.approx(0.15, abs=0.01)


def test_without_whole_word_masking_pieces_of_a_word_are_chosen_alone(prepared):
    """The default stays per token (the check above is not vacuous: here pieces are split)."""
    n = 1000
    batch = Collator(prepared.tokenizer, 64, 0.15, seed=5)(prepared.train, list(range(n)), list(range(n)), [0] * n)
    continues = torch.from_numpy(continuation_table(prepared.tokenizer))
    chosen = batch.labels != IGNORE_INDEX
    ids = torch.where(chosen, batch.labels, batch.input_ids)
    continuation = continues[ids] & batch.attention_mask.bool()
    assert not torch.equal(chosen[:, 1:][continuation[:, 1:]], chosen[:, :-1][continuation[:, 1:]])


@pytest.mark.parametrize("objective", ["mlm", "electra"])
def test_biases_and_layernorm_weights_are_not_decayed(objective, prepared):
    """Two groups, every trainable parameter in one of them once: biases and LayerNorm weights at weight decay 0,
    the embeddings and the other weights at --weight_decay (planted: LayerNorm weights left in the decayed group)."""
    cfg = RunConfig(objective=objective)
    module = build_objective(cfg, prepared.tokenizer)
    decayed, exempt = parameter_groups(module, 0.01)
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.01, 0.0)
    names = {id(p): name for name, p in module.named_parameters()}
    grouped = [id(p) for p in decayed["params"] + exempt["params"]]
    assert sorted(grouped) == sorted(names) and len(set(grouped)) == len(grouped)
    exempt_names = {names[id(p)] for p in exempt["params"]}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in exempt_names)
    assert any("LayerNorm.weight" in n for n in exempt_names)
    assert all(not n.endswith(".bias") and "LayerNorm" not in n for n in decayed_names)
    assert any("word_embeddings" in n for n in decayed_names)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_schedule_warms_up_to_lr_and_ends_at_min_lr(schedule):
    """The DeepSpeed scheduler built for --lr_schedule, stepped as the engine steps it (after each optimizer step,
    from iteration 0): --min_lr at the start, --lr at the end of the warm-up, falling to --min_lr by the last step;
    the cosine is above the straight line a quarter of the way down."""
    cfg = RunConfig(lr_schedule=schedule, lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    ds, _, _ = build_ds_config(cfg, 1, (False, "test"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = getattr(lr_schedules, ds["scheduler"]["type"])(optimizer, **ds["scheduler"]["params"])
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[1] == pytest.approx(cfg.min_lr, rel=1e-6)
    # the peak: --lr (DeepSpeed's cosine is already one step down it, 2e-4 below)
    assert max(lrs) == pytest.approx(cfg.lr, rel=1e-3) and lrs.index(max(lrs)) == cfg.warmup_steps + 1
    one_step = (cfg.lr - cfg.min_lr) / (cfg.max_steps - cfg.warmup_steps)  # of the linear decay
    assert cfg.min_lr <= lrs[-1] <= cfg.min_lr + 1.01 * one_step
    quarter, line = lrs[cfg.warmup_steps + 26], cfg.min_lr + 0.75 * (cfg.lr - cfg.min_lr)  # a quarter down
    assert (quarter > 1.05 * line) if schedule == "cosine" else quarter == pytest.approx(line, rel=1e-6)
    assert ds["scheduler"]["type"] == {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}[schedule]


def test_min_lr_above_lr_is_refused():
    from tnf_scale.config import parse_args
    from tnf_scale.errors import ConfigError

    with pytest.raises(ConfigError, match="--min_lr must lie between 0 and --lr 0.001, got 0.01"):
        parse_args(["--lr", "1e-3", "--min_lr", "1e-2"])
