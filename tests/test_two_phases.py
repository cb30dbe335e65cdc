"""BERT's two phases and --init_from: phase 2 continues phase 1 at a longer sequence length with its weights, notes,
tokenizer and rare words; a run starts from a Hugging Face model's weights.

Three launches, shared: phase 1 on one rank at 64 tokens, continuing a model written by save_pretrained (its
512-position table, its tokenizer; rare words counted on the corpus, notes fresh); phase 2 from phase 1 on two ranks
at 128 tokens, checkpointed half way; and phase 2 resumed from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EVAL_SEQUENCES, assert_same_evaluations, evaluations, launch, save_random_bert, train_args
from safetensors.torch import load_file

from tnf_scale.checkpoint import CheckpointMarker, latest_complete, read_rank_files, union_of_ranks
from tnf_scale.config import parse_args
from tnf_scale.errors import ConfigError

PHASE_1 = dict(max_steps=6, dropout=0.0, warmup_steps=2, eval_interval=6)
PHASE_2 = dict(max_steps=4, max_seq_len=128, save_interval=2, eval_interval=2, warmup_steps=2, micro_batch_size=4)


def phase_2_args(phase_1: Path, out: Path, **flags) -> list[str]:
    """A phase 2's command line: only what changes (the data and shape settings are phase 1's)."""
    values = {"init_from": phase_1, "output_dir": out, "precision": "fp32", "global_batch_size": 16,
              "eval_sequences": EVAL_SEQUENCES, **PHASE_2, **flags}  # fmt: skip
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


@pytest.fixture(scope="module")
def saved_model(prepared, tmp_path_factory) -> Path:
    """A freshly initialised BERT of the tiny shape with 512 positions and the test corpus's tokenizer, as
    save_pretrained writes it: the published model a user continues."""
    torch.manual_seed(7)
    return save_random_bert(
        prepared.tokenizer, tmp_path_factory.mktemp("saved_model"), hidden_size=128, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=512, max_position_embeddings=512,
    )  # fmt: skip


@pytest.fixture(scope="module")
def phase_1(small_config, saved_model, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("phase_1") / "run"
    proc = launch(1, ["tnf_scale/train.py", *train_args(small_config, out, init_from=saved_model, **PHASE_1)])
    return out, proc.stdout


@pytest.fixture(scope="module")
def phase_2(phase_1, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("phase_2") / "run"
    proc = launch(2, ["tnf_scale/train.py", *phase_2_args(phase_1[0], out)])
    return out, proc.stdout


def final_notes(run: Path) -> dict[str, torch.Tensor]:
    """The note dictionary of a run's final checkpoint, rows in id order (ids, vectors, noted)."""
    ckpt = latest_complete(run)
    rows = union_of_ranks(read_rank_files(ckpt, CheckpointMarker.read(ckpt).world_size))
    order = torch.argsort(rows["ids"])
    return {key: value[order] for key, value in rows.items()}


def test_phase_2_takes_phase_1s_settings_and_refuses_another_shape(phase_1):
    run, _ = phase_1
    cfg = parse_args(["--init_from", str(run), "--max_seq_len", "128"])
    assert (cfg.max_position_embeddings, cfg.max_seq_len, cfg.vocab_size, cfg.rare_coverage) == (512, 128, 2000, 0.05)
    relative = parse_args(["--init_from", os.path.relpath(run)])  # recorded absolute: found from anywhere later
    assert relative.init_from == str(run.resolve())
    with pytest.raises(ConfigError, match=r"gives --hidden_size 128; .* --hidden_size 256 cannot apply: drop the flag"):
        parse_args(["--init_from", str(run), "--hidden_size", "256"])
    with pytest.raises(ConfigError, match="--max_seq_len 1024 exceeds the model's 512 positions"):
        parse_args(["--init_from", str(run), "--max_seq_len", "1024"])


@torch.no_grad()
def test_a_run_from_a_saved_model_starts_at_that_models_loss(small_config, saved_model, phase_1):
    """Phase 1 continues a model written by save_pretrained: its step-0 held-out loss is what stock transformers
    computes for that model on the same batch; the rare band is counted on the corpus under the model's tokenizer,
    and the notes start fresh (planted: weights not loaded, the loss is a fresh model's)."""
    from transformers import BertForMaskedLM

    from tnf_scale.data.collate import EVAL_EPOCH, Collator
    from tnf_scale.data.prepared import prepare_data
    from tnf_scale.model.objective import MaskedLMObjective

    run, stdout = phase_1
    assert f"initialised from {saved_model}: its weights, tokenizer and positions; notes start fresh" in stdout
    data = prepare_data(
        dataclasses.replace(small_config, tokenizer=str(saved_model)), log=lambda *_: None, show_progress=False
    )
    assert (run / "tokenizer" / "rare_vocab.tsv").read_bytes() == data.rare_vocab_path.read_bytes()
    batch = Collator(data.tokenizer, 64, 0.15, seed=1234)(
        data.eval, list(range(EVAL_SEQUENCES)), list(range(EVAL_SEQUENCES)), [EVAL_EPOCH] * EVAL_SEQUENCES
    )
    objective = MaskedLMObjective(BertForMaskedLM.from_pretrained(str(saved_model)).eval())
    (ce,) = objective(**objective.inputs(batch))
    expected = float(ce.double().sum()) / int((batch.labels != -100).sum())
    assert evaluations(run)[0]["eval_loss_no_notes"] == pytest.approx(expected, rel=1e-5)


def test_phase_2_starts_from_phase_1s_notes_bit_for_bit(phase_1, phase_2):
    """Phase 1 noted its words on one rank; phase 2, on two, holds those notes: each word phase 2 did not write
    again keeps phase 1's note exactly (planted: notes not loaded, they are the fresh initial ones)."""
    (first, _), (run, stdout) = phase_1, phase_2
    assert f"phase 2 of {first} (finished at step 6)" in stdout
    before, after = final_notes(first), final_notes(run)
    assert torch.equal(before["ids"], after["ids"])
    assert bool(after["noted"][before["noted"]].all())  # what phase 1 noted stays noted
    kept = (after["vectors"] == before["vectors"]).all(dim=1)
    noted_in_phase_1 = before["noted"]
    assert int(noted_in_phase_1.sum()) > 100
    assert int((kept & noted_in_phase_1).sum()) > 0.5 * int(noted_in_phase_1.sum())
    assert int((~kept).sum()) > 0  # and phase 2 wrote notes of its own


def test_phase_2_trains_the_positions_phase_1_never_reached(phase_1, phase_2):
    """Positions 64..127 change in phase 2 as much as the ones phase 1 trained; 128.. only decay (planted: packing
    at phase 1's length leaves 64..127 as still as 128..)."""
    (first, _), (run, _) = phase_1, phase_2
    key = "bert.embeddings.position_embeddings.weight"
    before = load_file(str(first / "export" / "model.safetensors"))[key]
    change = (load_file(str(run / "export" / "model.safetensors"))[key] - before).abs().mean(dim=1)
    assert change.shape == (512,)
    assert change[64:128].mean() > 0.5 * change[:64].mean()
    assert change[64:128].mean() > 100 * change[128:].mean()


def test_phase_2_resumes_inside_phase_2(phase_1, phase_2, tmp_path):
    run, _ = phase_2
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000004")
    for name in ("export", "notes.safetensors"):
        target = resumed / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    proc = launch(2, ["tnf_scale/train.py", *phase_2_args(phase_1[0], resumed, resume="true")])
    assert "at step 2" in proc.stdout
    assert_same_evaluations(resumed, run, [4])
    assert torch.equal(final_notes(resumed)["vectors"], final_notes(run)["vectors"])  # as every resume here: exact


@torch.no_grad()
def test_the_export_has_512_positions_and_stock_transformers_runs_it_on_300_tokens(phase_2):
    from transformers import AutoTokenizer, BertForMaskedLM

    run, _ = phase_2
    model = BertForMaskedLM.from_pretrained(str(run / "export")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(run / "export"))
    assert model.config.max_position_embeddings == 512 == tokenizer.model_max_length
    encoded = tokenizer(" ".join(["the river ran past the old mill"] * 60), truncation=True, max_length=300,
                        return_tensors="pt")  # fmt: skip
    assert encoded["input_ids"].shape == (1, 300)
    logits = model(**encoded).logits
    assert logits.shape == (1, 300, len(tokenizer)) and bool(torch.isfinite(logits).all())


def test_a_phase_2_with_other_rare_words_or_another_tokenizer_is_refused(small_config, saved_model, phase_1, tmp_path):
    """Before the run directory is claimed (startup.start checks the prepared data): phase 1's notes belong to its
    rare words under its tokenizer."""
    from tnf_scale.data.prepared import prepare_data
    from tnf_scale.init_from import check_same_words, read_init_source

    source = read_init_source(str(phase_1[0]))
    own = dataclasses.replace(small_config, tokenizer=str(saved_model))
    data = prepare_data(own, log=lambda *_: None, show_progress=False)
    check_same_words(source, data.tokenizer_dir, data.rare_vocab_path)  # phase 1's own data: accepted
    other_band = prepare_data(dataclasses.replace(own, rare_coverage=0.03), log=lambda *_: None, show_progress=False)
    with pytest.raises(ConfigError, match="has another rare vocabulary than phase 1's"):
        check_same_words(source, other_band.tokenizer_dir, other_band.rare_vocab_path)
    other_tokenizer = tmp_path / "tokenizer"
    shutil.copytree(data.tokenizer_dir, other_tokenizer)
    (other_tokenizer / "tokenizer.json").write_text(
        (other_tokenizer / "tokenizer.json").read_text().replace("##", "@@")
    )
    with pytest.raises(ConfigError, match="has another tokenizer than phase 1's"):
        check_same_words(source, other_tokenizer, data.rare_vocab_path)


def test_the_reports_read_a_two_phase_run_as_one(phase_1, phase_2):
    """Phase 2's records follow phase 1's: steps, tokens and training time go on counting; its step-0 evaluation
    (phase 1's final model scored again) is left out."""
    from tnf_scale.metrics import read_history, read_metrics

    (first_run, _), (run, _) = phase_1, phase_2
    history = read_history(run)
    first, second = read_metrics(first_run), read_metrics(run)
    assert [r["step"] for r in history] == [r["step"] for r in first] + [6 + r["step"] for r in second[1:]]
    assert [r["phase"] for r in history] == [1] * len(first) + [2] * (len(second) - 1)
    assert history[-1]["tokens"] == first[-1]["tokens"] + second[-1]["tokens"]
    assert history[-1]["wall_time"] == pytest.approx(first[-1]["wall_time"] + second[-1]["wall_time"])


@pytest.mark.parametrize("objective", ["mlm", "electra"])
def test_init_from_a_hugging_face_directory_loads_every_weight_and_the_shape(objective, prepared, tmp_path):
    """In-process, both objectives: the networks saved as stock models (ELECTRA's generator in generator/) give the
    shape settings, and a network built from them with another seed takes every weight back, bit for bit, the shared
    ELECTRA embeddings included."""
    from tnf_scale.config import RunConfig
    from tnf_scale.init_from import load_weights, read_init_source
    from tnf_scale.model.build import build_objective

    saved = build_objective(RunConfig(objective=objective, max_position_embeddings=256, seed=3), prepared.tokenizer)
    networks = [(saved.mlm, tmp_path)] if objective == "mlm" else [
        (saved.discriminator, tmp_path), (saved.generator, tmp_path / "generator")]  # fmt: skip
    for network, folder in networks:
        network.save_pretrained(str(folder))
    prepared.tokenizer.save_pretrained(str(tmp_path))
    source = read_init_source(str(tmp_path))
    assert source.settings["max_position_embeddings"] == 256 and source.settings["tokenizer"] == str(tmp_path)
    cfg = RunConfig(**{k: v for k, v in source.settings.items() if k != "tokenizer"}, seed=4)
    built = build_objective(cfg, prepared.tokenizer)
    assert not torch.equal(built.state_dict()[next(iter(saved.state_dict()))], next(iter(saved.state_dict().values())))
    load_weights(built, source)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match="gives --hidden_size 128; .* --hidden_size 64 cannot apply"):
        parse_args(["--init_from", str(tmp_path), "--hidden_size", "64"])
