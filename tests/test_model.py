"""TNF hooks on Hugging Face BERT: plain BERT when idle, the spec's mix and pooling when set."""
from __future__ import annotations

import dataclasses

import torch
from transformers import BertForMaskedLM

from tnf_scale.data.sampler import Collator
from tnf_scale.model.tnf_bert import MaskedLMObjective, TnfHooks, build_bert
from tnf_scale.notes.note_math import pool_windows


def models(small_config, prepared):
    cfg = dataclasses.replace(small_config, dropout=0.0)
    tnf = build_bert(cfg, prepared.tokenizer)
    hooks = TnfHooks(tnf, lam=0.5, window=3)
    plain = BertForMaskedLM(tnf.config)
    plain.load_state_dict(tnf.state_dict())
    return tnf.eval(), hooks, plain.eval()


def a_batch(prepared, n=4):
    return Collator(prepared.tokenizer, 64, 0.15, seed=1)(prepared.train, list(range(n)), list(range(n)), [0] * n)


@torch.no_grad()
def test_idle_hooks_give_the_plain_bert_forward(small_config, prepared):
    tnf, hooks, plain = models(small_config, prepared)
    batch = a_batch(prepared)
    assert len(batch.occ_rare) > 0
    got = tnf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(got, want)


@torch.no_grad()
def test_objective_is_the_summed_hugging_face_mlm_loss(small_config, prepared):
    tnf, hooks, plain = models(small_config, prepared)
    batch = a_batch(prepared)
    summed = MaskedLMObjective(tnf)(batch.input_ids, batch.attention_mask, batch.labels)
    mean = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(summed, mean * (batch.labels != -100).sum(), rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_reads_change_the_forward_and_captures_pool_the_last_layer(small_config, prepared):
    tnf, hooks, plain = models(small_config, prepared)
    batch = a_batch(prepared)
    rows = torch.randn(len(batch.occ_rare), tnf.config.hidden_size)
    hooks.set_reads(batch.occ_sample, batch.occ_start, batch.occ_end, rows, batch.input_ids.shape[1])
    hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
    mixed = tnf.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    pooled = hooks.pooled
    hooks.clear()
    plain_out = tnf.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    assert hooks.pooled is None  # cleared hooks take no notes
    assert not torch.allclose(mixed, plain_out)
    torch.testing.assert_close(pooled, pool_windows(mixed, batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths, 3))
    # samples without any occurrence are not affected by the notes of the others
    without = [i for i in range(len(batch.lengths)) if i not in set(batch.occ_sample.tolist())]
    for i in without:
        torch.testing.assert_close(mixed[i], plain_out[i])
