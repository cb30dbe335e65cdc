"""TNF hooks on Hugging Face BERT: plain BERT when idle, the spec's mix and pooling when set."""

from __future__ import annotations

import dataclasses

import torch
from transformers import BertForMaskedLM

from tnf_scale.data.collate import Collator
from tnf_scale.model.compile import compile_encoder_layers
from tnf_scale.model.objective import LossSums, MaskedLMObjective, loss_parts
from tnf_scale.model.tnf_bert import TnfHooks, build_bert
from tnf_scale.notes.note_math import pool_windows
from tnf_scale.spans import expand_spans


def models(small_config, prepared):
    cfg = dataclasses.replace(small_config, dropout=0.0)
    tnf = build_bert(cfg, prepared.tokenizer)
    hooks = TnfHooks([tnf.bert], tnf.bert, lam=0.5, window=3)
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
def test_objective_gives_the_hugging_face_mlm_loss_per_predicted_token(small_config, prepared):
    tnf, hooks, plain = models(small_config, prepared)
    batch = a_batch(prepared)
    (per_token,) = MaskedLMObjective(tnf)(**MaskedLMObjective(tnf).inputs(batch))
    assert per_token.shape == ((batch.labels != -100).sum(),)
    summed = per_token.sum()
    mean = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    torch.testing.assert_close(summed, mean * (batch.labels != -100).sum(), rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_reads_change_the_forward_and_captures_pool_the_last_layer(small_config, prepared):
    tnf, hooks, plain = models(small_config, prepared)
    batch = a_batch(prepared)
    rows = torch.randn(len(batch.occ_rare), tnf.config.hidden_size)
    hooks.set_reads(*expand_spans(batch.occ_sample, batch.occ_start, batch.occ_end, batch.input_ids.shape[1]), rows)
    hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
    mixed = tnf.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    pooled = hooks.pooled
    hooks.clear()
    plain_out = tnf.bert(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    assert hooks.pooled is None  # cleared hooks take no notes
    assert not torch.allclose(mixed, plain_out)
    torch.testing.assert_close(
        pooled, pool_windows(mixed, batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths, 3)
    )
    # samples without any occurrence are not affected by the notes of the others
    without = [i for i in range(len(batch.lengths)) if i not in set(batch.occ_sample.tolist())]
    for i in without:
        torch.testing.assert_close(mixed[i], plain_out[i])


def embedded(model, hooks, batch, rows=None):
    """The embedding output (after LayerNorm) of `batch`, notes mixed in at reading occurrences when `rows` is given."""
    if rows is not None:
        hooks.set_reads(batch.read_token_index, batch.read_token_occ, rows)
    try:
        return model.bert.embeddings(input_ids=batch.input_ids)
    finally:
        hooks.clear()


@torch.no_grad()
def test_a_masked_occurrence_reads_no_note_and_an_unmasked_one_does(small_config, prepared):
    tnf, hooks, _ = models(small_config, prepared)
    n = 8
    batch = Collator(prepared.tokenizer, 64, 0.3, seed=1)(prepared.train, list(range(n)), list(range(n)), [0] * n)
    predicted = batch.labels != -100
    holds_predicted = [
        bool(predicted[b, s : t + 1].any())
        for b, s, t in zip(batch.occ_sample.tolist(), batch.occ_start.tolist(), batch.occ_end.tolist())
    ]
    assert batch.occ_reads.tolist() == [not h for h in holds_predicted]
    assert 0 < sum(holds_predicted) < len(holds_predicted)  # the batch has both kinds
    rows = torch.randn(int(batch.occ_reads.sum()), tnf.config.hidden_size)
    mixed, plain = embedded(tnf, hooks, batch, rows), embedded(tnf, hooks, batch)
    for i, (b, s, t) in enumerate(zip(batch.occ_sample.tolist(), batch.occ_start.tolist(), batch.occ_end.tolist())):
        if holds_predicted[i]:
            assert torch.equal(mixed[b, s : t + 1], plain[b, s : t + 1]), i  # bit for bit: no note given away
        else:
            assert not torch.allclose(mixed[b, s : t + 1], plain[b, s : t + 1]), i
    assert torch.equal(batch.in_rare_span, span_mask_by_hand(batch))


def span_mask_by_hand(batch):
    mask = torch.zeros_like(batch.labels, dtype=torch.bool)
    for b, s, t in zip(batch.occ_sample.tolist(), batch.occ_start.tolist(), batch.occ_end.tolist()):
        mask[b, s : t + 1] = True
    return mask


@torch.no_grad()
def test_the_leaky_ablation_mixes_notes_at_masked_spans_again(small_config, prepared):
    tnf, hooks, _ = models(small_config, prepared)
    n = 8
    leaky = Collator(prepared.tokenizer, 64, 0.3, seed=1, notes_at_masked=True)(
        prepared.train, list(range(n)), list(range(n)), [0] * n
    )
    safe = Collator(prepared.tokenizer, 64, 0.3, seed=1)(prepared.train, list(range(n)), list(range(n)), [0] * n)
    assert torch.equal(leaky.labels, safe.labels) and bool(leaky.occ_reads.all()) and not bool(safe.occ_reads.all())
    rows = torch.randn(len(leaky.occ_rare), tnf.config.hidden_size)
    mixed, plain = embedded(tnf, hooks, leaky, rows), embedded(tnf, hooks, leaky)
    masked_occ = torch.nonzero(~safe.occ_reads).flatten().tolist()
    for i in masked_occ:
        b, s, t = int(leaky.occ_sample[i]), int(leaky.occ_start[i]), int(leaky.occ_end[i])
        assert not torch.allclose(mixed[b, s : t + 1], plain[b, s : t + 1]), i


def test_split_losses_recombine_into_the_overall_loss():
    torch.manual_seed(3)
    token_ce = torch.rand(3, 50) * 8
    in_rare = torch.rand(3, 50) < 0.1
    sums = LossSums.from_parts(sum(loss_parts(ce, rare) for ce, rare in zip(token_ce, in_rare)))
    assert sums.tokens_rare == int(in_rare.sum()) and abs(sums.ce_rare - float(token_ce[in_rare].sum())) < 1e-4
    losses = sums.losses("loss")
    assert sums.tokens_rare > 0 and sums.tokens_other > 0
    recombined = (sums.tokens_rare * losses["loss_rare"] + sums.tokens_other * losses["loss_other"]) / (
        sums.tokens_rare + sums.tokens_other
    )
    assert abs(recombined - losses["loss"]) < 1e-6
    assert losses["loss_rare"] != losses["loss_other"]
    assert LossSums().losses("loss") == {} and set(LossSums(1.0, 2.0, 0, 4).losses("x")) == {"x", "x_other"}


class _RunsCode:
    def __reduce__(self):
        return (print, ("a tampered checkpoint ran code",))


def test_export_reads_a_zero_disabled_checkpoint_without_unpickling_code(small_config, prepared, tmp_path):
    import pytest

    from tnf_scale.errors import ConfigError
    from tnf_scale.model.export import consolidated_state_dict

    model = build_bert(small_config, prepared.tokenizer)
    ckpt = tmp_path / "step00000001"
    ckpt.mkdir()
    module = {f"mlm.{k}": v for k, v in model.state_dict().items()}  # as MaskedLMObjective holds it
    torch.save(
        {"module": module, "ds_version": "0.19.8", "lr_scheduler": {"last_batch_iteration": 0}},
        ckpt / "mp_rank_00_model_states.pt",
    )
    state = consolidated_state_dict(ckpt, model.config)
    assert state.keys() == module.keys() and all(torch.equal(state[k], v) for k, v in module.items())
    torch.save({"module": module, "extra": _RunsCode()}, ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="holds objects other than tensors and plain data; it was not loaded"):
        consolidated_state_dict(ckpt, model.config)


def test_a_micro_batch_without_padding_trains_the_same_without_its_attention_mask(small_config, prepared):
    """The mask-free path (`Batch.model_attention_mask` is None when nothing is padding): the loss and every gradient
    are bit for bit those of the all-ones mask, in fp32 and in bf16 (planted: a mask hiding the last position, which
    a wrong "no padding" decision would drop, changes them)."""
    cfg = dataclasses.replace(small_config, dropout=0.0)
    ids = torch.randint(5, len(prepared.tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.15, ids, -100)
    predicted = torch.nonzero(labels.flatten() != -100).flatten()
    hides_last = torch.ones_like(ids)
    hides_last[:, -1] = 0

    def trained(mask, dtype):
        objective = MaskedLMObjective(build_bert(cfg, prepared.tokenizer).to(dtype))
        (losses,) = objective(ids, mask, labels, predicted)
        losses.sum().backward()
        return losses.detach(), [p.grad for p in objective.parameters() if p.grad is not None]

    for dtype in (torch.float32, torch.bfloat16):
        loss, grads = trained(None, dtype)
        same_loss, same_grads = trained(torch.ones_like(ids), dtype)
        assert torch.equal(loss, same_loss) and all(torch.equal(a, b) for a, b in zip(grads, same_grads))
        assert not torch.equal(loss, trained(hides_last, dtype)[0])


def test_compiled_encoder_layers_train_as_the_eager_ones_with_notes_read_and_taken(small_config, prepared):
    """--compile compiles every encoder layer and leaves the note seam eager: with dropout off (compiled dropout draws
    other random numbers), the loss, the notes taken and every gradient match the eager model's within fp32 rounding
    of reordered sums (loss 1e-5 relative; notes 1e-5 relative or 1e-6 absolute, the largest difference seen 8e-7;
    gradients 1e-4 relative or 1e-6 absolute; planted: a compiled layer at another LayerNorm eps moves the notes
    taken past them)."""
    cfg = dataclasses.replace(small_config, dropout=0.0)
    batch = a_batch(prepared)
    rows = torch.randn(int(batch.occ_reads.sum()), cfg.hidden_size, generator=torch.Generator().manual_seed(2))

    def trained(compiled: bool):
        objective = MaskedLMObjective(build_bert(cfg, prepared.tokenizer))
        hooks = TnfHooks(objective.note_readers(), objective.note_writer(), lam=0.5, window=3)
        if compiled:
            assert compile_encoder_layers(objective) == cfg.num_layers
        hooks.set_reads(batch.read_token_index, batch.read_token_occ, rows)
        hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
        (losses,) = objective(**objective.inputs(batch))
        losses.sum().backward()
        return losses.sum().detach(), hooks.pooled, {n: p.grad for n, p in objective.named_parameters()}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    loss, notes, grads = trained(compiled=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    want_loss, want_notes, want_grads = trained(compiled=False)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(notes, want_notes, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
