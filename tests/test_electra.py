"""ELECTRA's replaced-token detection with notes (docs/electra.md): the objective in-process, then launched runs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ELECTRA_RUN, EVAL_SEQUENCES, assert_same_evaluations, evaluations, launch, start_ranks, train_args
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, ElectraForMaskedLM, ElectraForPreTraining

from tnf_scale.config import parse_args
from tnf_scale.data.batch import IGNORE_INDEX
from tnf_scale.data.collate import EVAL_EPOCH, Collator
from tnf_scale.errors import ConfigError
from tnf_scale.launch import free_port
from tnf_scale.metrics import read_metrics
from tnf_scale.model.electra import ElectraObjective, build_electra, sample_replacements
from tnf_scale.model.tnf_bert import TnfHooks
from tnf_scale.notes.note_math import initial_notes
from tnf_scale.train import main as train_main


def electra(small_config, prepared, **changes) -> ElectraObjective:
    cfg = dataclasses.replace(small_config, objective="electra", dropout=0.0, **changes)
    return build_electra(cfg, prepared.tokenizer).eval()


def collate(prepared, indices, seed=1):
    return Collator(prepared.tokenizer, 64, 0.15, seed=seed)(prepared.train, indices, indices, [0] * len(indices))


def test_generator_and_discriminator_share_one_set_of_embedding_tables(small_config, prepared):
    objective = electra(small_config, prepared)
    gen, disc = objective.generator.electra.embeddings, objective.discriminator.electra.embeddings
    for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        assert getattr(gen, table).weight is getattr(disc, table).weight
    assert (
        objective.generator.generator_lm_head.weight is disc.word_embeddings.weight
    )  # the generator's output layer too
    assert gen.LayerNorm is not disc.LayerNorm  # each network keeps its own seam
    assert (
        objective.generator.config.hidden_size
        == small_config.hidden_size // 4
        < objective.discriminator.config.hidden_size
    )
    tables = [n for n, _ in objective.named_parameters() if "word_embeddings" in n or "generator_lm_head.weight" in n]
    assert len(tables) == 1  # one parameter, counted (and so updated) once


def test_sampling_is_inverse_cdf_and_a_sample_equal_to_the_original_counts_as_original(small_config, prepared):
    logits = torch.tensor([[0.0, 10.0, -10.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert sample_replacements(logits, torch.tensor([0.5, 0.2, 0.9])).tolist() == [1, 0, 2]
    objective = electra(small_config, prepared)
    batch = collate(prepared, [0, 1])
    masked = batch.labels != IGNORE_INDEX
    originals = batch.labels[masked]
    want_same = torch.arange(len(originals)) % 2 == 0  # every other masked position: all mass on the original token
    other = (originals + 1) % objective.discriminator.config.vocab_size
    logits = torch.full((len(originals), objective.discriminator.config.vocab_size), -1e4)
    logits[torch.arange(len(originals)), torch.where(want_same, originals, other)] = 0.0
    filled, replaced = objective.filled(
        batch.input_ids, batch.labels, batch.predicted_index, logits, batch.sample_uniform
    )
    assert torch.equal(filled[masked], torch.where(want_same, originals, other))
    assert torch.equal(filled[~masked], batch.input_ids[~masked])  # unmasked positions keep their original token
    assert torch.equal(replaced[masked], ~want_same) and not replaced[~masked].any()


@torch.no_grad()
def test_a_sample_s_replacements_do_not_depend_on_its_micro_batch(small_config, prepared):
    objective = electra(small_config, prepared)
    together = collate(prepared, [3, 4, 5, 6])
    alone = collate(prepared, [5])
    assert (
        torch.equal(together.sample_uniform[2], alone.sample_uniform[0])
        and together.sample_uniform[2, :5].unique().numel() == 5
    )
    captured = []
    objective.discriminator.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs["input_ids"]), with_kwargs=True
    )
    for batch in (together, alone):
        objective(**objective.inputs(batch))
    assert torch.equal(captured[0][2], captured[1][0])  # the same filled sequence for sample 5


@torch.no_grad()
def test_tnf_off_electra_is_the_stock_hugging_face_electra_forward(small_config, prepared):
    objective = electra(small_config, prepared)
    gen_cfg, disc_cfg = objective.generator.config, objective.discriminator.config
    stock_gen, stock_disc = ElectraForMaskedLM(gen_cfg).eval(), ElectraForPreTraining(disc_cfg).eval()
    stock_disc.load_state_dict(objective.discriminator.state_dict())
    stock_gen.load_state_dict(objective.generator.state_dict())
    batch = collate(prepared, [0, 1, 2, 3])
    gen_ce, disc_bce, disc_error, replaced_share = objective(**objective.inputs(batch))
    masked, real = batch.labels != IGNORE_INDEX, batch.attention_mask.bool()
    stock_mlm = stock_gen(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    torch.testing.assert_close(gen_ce.mean(), stock_mlm.loss, rtol=1e-5, atol=1e-5)
    logits = stock_mlm.logits[masked]
    filled, replaced = objective.filled(
        batch.input_ids, batch.labels, batch.predicted_index, logits, batch.sample_uniform
    )
    stock_rtd = stock_disc(input_ids=filled, attention_mask=batch.attention_mask, labels=replaced.long())
    torch.testing.assert_close(disc_bce.mean(), stock_rtd.loss, rtol=1e-5, atol=1e-5)
    wrong = ((stock_rtd.logits > 0) != replaced)[real].float()
    assert torch.equal(disc_error, wrong) and torch.equal(replaced_share, replaced[masked].float())
    assert len(gen_ce) == int(masked.sum()) and len(disc_bce) == int(real.sum())


@torch.no_grad()
@pytest.mark.parametrize("notes_in", ["discriminator", "generator", "both"])
def test_notes_are_mixed_only_at_spans_without_a_masked_or_replaced_token(small_config, prepared, notes_in):
    objective = electra(small_config, prepared, notes_in=notes_in)
    hooks = TnfHooks(objective.note_readers(), objective.note_writer(), lam=0.5, window=3)
    batch = collate(prepared, list(range(8)))
    mixed = {}
    for name in ("generator", "discriminator"):
        embeddings = getattr(objective, name).electra.embeddings

        def plain_sum(ids, embeddings=embeddings):  # the summed input embedding without any note
            positions = torch.arange(ids.shape[1])
            return (
                embeddings.word_embeddings(ids)
                + embeddings.position_embeddings(positions)
                + embeddings.token_type_embeddings(torch.zeros_like(ids))
            )

        seen = {}
        embeddings.register_forward_pre_hook(
            lambda module, args, kwargs, seen=seen: seen.update(ids=kwargs["input_ids"]), with_kwargs=True
        )
        embeddings.LayerNorm.register_forward_pre_hook(  # registered after the mixer: sees its output
            lambda module, args, name=name, seen=seen, plain_sum=plain_sum: mixed.update(
                {name: ~torch.isclose(args[0], plain_sum(seen["ids"]), atol=1e-6).all(-1)}
            )
        )
    rows = torch.randn(int(batch.occ_reads.sum()), small_config.hidden_size)
    hooks.set_reads(batch.read_token_index, batch.read_token_occ, rows)
    hooks.set_capture(batch.occ_sample, batch.occ_start, batch.occ_end, batch.lengths)
    objective(**objective.inputs(batch))
    assert hooks.pooled.shape == (len(batch.occ_rare), small_config.hidden_size)  # every occurrence writes
    masked = batch.labels != IGNORE_INDEX
    read_positions = torch.zeros_like(masked)
    for sample, start, end in zip(*batch.read_spans[1:]):
        read_positions[sample, start : end + 1] = True
    assert (~batch.occ_reads).any() and read_positions.any()  # some spans read, some hold a masked token and do not
    for name in ("generator", "discriminator"):
        reads = notes_in in (name, "both")
        assert torch.equal(mixed[name], read_positions if reads else torch.zeros_like(masked)), name
        assert not (mixed[name] & masked).any()  # never where a token is masked (and so possibly replaced)


def test_bad_electra_settings_are_one_sentence_each():
    with pytest.raises(ConfigError, match="would make the generator larger than the discriminator"):
        parse_args(["--preset", "electra-tiny", "--generator_fraction", "1.5"])
    with pytest.raises(ConfigError, match=r"--rtd_weight must be a finite number above 0"):
        parse_args(["--preset", "electra-tiny", "--rtd_weight", "0"])
    with pytest.raises(ConfigError, match="--notes_in must be one of discriminator, generator, both"):
        parse_args(["--preset", "electra-tiny", "--notes_in", "encoder"])
    with pytest.raises(ConfigError, match="--objective must be one of mlm, electra"):
        parse_args(["--objective", "t5"])
    with pytest.raises(ConfigError, match="divides into its heads"):
        parse_args(
            ["--preset", "electra-tiny", "--num_heads", "16", "--generator_fraction", "0.3"]
        )  # 38 units, 5 heads
    assert parse_args(["--preset", "electra-base"]).generator_shape == (256, 4, 1024)  # ELECTRA-Base's generator


def test_the_generator_reads_notes_by_default_and_discriminator_reads_are_warned_of():
    """So is a baseline given a --notes_in it cannot act on (planted: the old warning said nothing of it)."""
    from tnf_scale.model.electra import notes_in_warning

    default = parse_args(["--preset", "electra-tiny"])
    assert default.notes_in == "generator" and notes_in_warning(default) is None
    for notes_in in ("discriminator", "both"):
        chosen = parse_args(["--preset", "electra-tiny", "--notes_in", notes_in])
        assert f"warning: --notes_in {notes_in}: the discriminator reads notes" in notes_in_warning(chosen)
    baseline = parse_args(["--preset", "electra-tiny", "--notes_in", "both", "--tnf", "off"])
    assert (
        notes_in_warning(baseline) == "warning: --notes_in both does nothing with --tnf off: a baseline reads no notes"
    )
    assert notes_in_warning(parse_args(["--preset", "electra-tiny", "--tnf", "off"])) is None  # the default, unsaid
    assert parse_args([]).notes_in is None  # BERT has one network
    with pytest.raises(ConfigError, match="--notes_in generator applies to ELECTRA"):
        parse_args(["--notes_in", "generator"])


def test_electra_on_pipeline_stages_is_refused_before_any_process_group(small_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing may connect: the refusal comes first
    args = train_args(small_config, tmp_path / "run", objective="electra", deepspeed_config="ds_configs/tiny_pp2.json")
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "--objective electra runs data parallel only" in err and "pipeline.stages" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def resumed_on_one_rank(small_config, electra_run, tmp_path_factory) -> tuple[Path, object]:
    """The 2-rank ZeRO-3 run's step-6 checkpoint resumed on 1 rank (a universal-checkpoint conversion): first, wrongly,
    with ZeRO-2 (the completed process is returned), then with ZeRO-3."""
    resumed = tmp_path_factory.mktemp("electra_resumed") / "run"
    shutil.copytree(electra_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000012")
    args = ["tnf_scale/train.py", *train_args(small_config, resumed, resume="true", **ELECTRA_RUN)]
    before = (resumed / "run_config.json").read_text()
    refused = start_ranks(1, free_port(), [*args, "--deepspeed_config", "ds_configs/zero2.json"], timeout=600)
    refused.run_config_kept = (resumed / "run_config.json").read_text() == before
    launch(1, [*args, "--deepspeed_config", "ds_configs/zero3.json"])
    return resumed, refused


@pytest.mark.launcher
def test_a_zero_3_checkpoint_resumed_with_another_zero_stage_is_refused_before_files_change(
    electra_run, resumed_on_one_rank
):
    _, refused = resumed_on_one_rank
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert (
        "was saved with ZeRO stage 3 and this run uses stage 2" in refused.stderr
        and "ds_configs/zero3.json" in refused.stderr
    )
    assert refused.run_config_kept


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


@pytest.mark.launcher
def test_electra_run_learns_both_networks_and_takes_notes(electra_run):
    steps = step_records(electra_run)
    assert list(steps) == list(range(1, 13))
    last = steps[12]
    assert all(
        r["loss"] == pytest.approx(r["loss_generator"] + 50 * r["loss_discriminator"], rel=1e-6) for r in steps.values()
    )
    assert all(
        0 < r["replaced_share"] <= 1 and r["occurrences_read"] > 0 and r["occurrences_skipped_masked"] > 0
        for r in steps.values()
    )
    evals = evaluations(electra_run)
    assert list(evals) == [0, 6, 12]
    # both networks learn, on the same held-out sequences (discriminator: eval_loss_*, generator: eval_gen_loss_*)
    assert evals[12]["eval_loss_no_notes"] < evals[6]["eval_loss_no_notes"] < evals[0]["eval_loss_no_notes"]
    assert evals[12]["eval_gen_loss_no_notes"] < evals[6]["eval_gen_loss_no_notes"] < evals[0]["eval_gen_loss_no_notes"]
    for key in (
        "eval_loss_notes_rare",
        "eval_loss_no_notes_other",
        "eval_disc_accuracy_no_notes",
        "eval_disc_accuracy_notes_rare",
        "eval_gen_loss_no_notes",
    ):
        assert key in evals[12], key
    assert 0.5 < evals[12]["eval_disc_accuracy_no_notes"] <= 1
    notes = load_file(str(electra_run / "notes.safetensors"))
    start = initial_notes(notes["ids"], notes["vectors"].shape[1], seed=1234, std=0.02)
    assert (
        int((notes["vectors"] != start).any(dim=1).sum()) == last["distinct_noted"] > 0
    )  # exactly the noted words moved


@pytest.mark.launcher
def test_the_2_rank_run_resumed_on_1_rank_trains_the_same_steps(electra_run, resumed_on_one_rank):
    """W = 1 and W = 2 agree: from the same checkpoint, one rank trains steps 7..12 as two ranks did (and the hostfile
    and MPI launches in test_launchers.py reproduce the 2-rank run's notes)."""
    resumed_on_one_rank, _ = resumed_on_one_rank
    two, one = step_records(electra_run), step_records(resumed_on_one_rank)
    assert list(one) == list(range(1, 13))
    for step in range(7, 13):
        for key in ("loss", "loss_generator", "loss_discriminator", "replaced_share"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-5), (step, key)
    assert_same_evaluations(resumed_on_one_rank, electra_run, [12])
    torch.testing.assert_close(
        load_file(str(resumed_on_one_rank / "notes.safetensors"))["vectors"],
        load_file(str(electra_run / "notes.safetensors"))["vectors"],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.launcher
def test_electra_exports_load_with_stock_transformers_and_hold_no_notes(electra_run, prepared, small_config):
    export = electra_run / "export"
    discriminator = ElectraForPreTraining.from_pretrained(str(export))
    generator = ElectraForMaskedLM.from_pretrained(str(export / "generator"))
    assert generator.config.hidden_size < discriminator.config.hidden_size
    assert torch.equal(
        generator.electra.embeddings.word_embeddings.weight, discriminator.electra.embeddings.word_embeddings.weight
    )
    for folder in (export, export / "generator"):
        assert not any("note" in name for name in load_file(str(folder / "model.safetensors")))
        assert (folder / "tokenizer.json").is_file()
    classifier = AutoModelForSequenceClassification.from_pretrained(str(export), num_labels=2)
    assert type(classifier).__name__ == "ElectraForSequenceClassification"
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(electra_run / "tokenizer")).get_vocab()
    # The export is the model in training: rebuilt from it, the objective gives the run's last held-out
    # discriminator loss.
    objective = ElectraObjective(generator.eval(), discriminator.eval(), rtd_weight=50.0, notes_in="discriminator")
    batch = Collator(prepared.tokenizer, small_config.max_seq_len, 0.15, seed=1234)(
        prepared.eval, list(range(EVAL_SEQUENCES)), list(range(EVAL_SEQUENCES)), [EVAL_EPOCH] * EVAL_SEQUENCES
    )
    with torch.no_grad():
        disc_bce = objective(**objective.inputs(batch))[1]
    assert float(disc_bce.mean()) == pytest.approx(evaluations(electra_run)[12]["eval_loss_no_notes"], rel=1e-5)


def test_the_electra_base_deepspeed_config_fills_in_for_eight_ranks():
    from tnf_scale.ds_config import build_ds_config

    cfg = parse_args(["--preset", "electra-base", "--deepspeed_config", "ds_configs/electra_base_zero2.json"])
    ds, dims, _ = build_ds_config(cfg, 8, (True, "a GPU of compute capability 8.0"), "")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        256,
        32,
        1,
    )
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] and ds["bf16"]["enabled"]
    assert (dims.pipeline, dims.data) == (1, 8)


@pytest.mark.parametrize("variant", ["ema", "learned"])
def test_an_electra_export_fine_tunes_with_its_notes_kept(variant, electra_run, tmp_path):
    """TNF-F (ema) and TNF-U (learned) on the exported discriminator: its rare words' notes are read from the run,
    mixed into the discriminator's embedding LayerNorm input, and move while fine-tuning (only the words read)."""
    from tnf_scale.finetune.notes import FINETUNED_NOTES_FILE
    from tnf_scale.finetune.run import FinetuneArgs, finetune
    from tnf_scale.finetune.tasks import file_task

    words = [line.split("\t")[0] for line in (electra_run / "tokenizer" / "rare_vocab.tsv").read_text().splitlines()
             if line and not line.startswith(("#", "word\t"))][:4]  # fmt: skip
    rows = [[f"the {w} is here", i % 2] for i, w in enumerate(words * 4)]
    for name in ("train", "validation"):
        (tmp_path / f"{name}.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    task = file_task(str(tmp_path / "train.tsv"), str(tmp_path / "validation.tsv"), "text", None, "label", "accuracy")
    args = FinetuneArgs(str(electra_run / "export"), str(tmp_path / "ft"), seeds=[1], lr=1e-3, epochs=1,
                        batch_size=4, notes=variant, save_models=True)  # fmt: skip
    finetune(task, args)
    saved = load_file(str(tmp_path / "ft" / "seed1" / "model" / FINETUNED_NOTES_FILE))["vectors"]
    pretrained = load_file(str(electra_run / "notes.safetensors"))["vectors"]
    change = (saved - pretrained).norm(dim=1)  # rare ids follow the file's order: the words read come first
    read, unread = change[: len(words)], change[len(words) :]
    assert read.min() > 0
    if variant == "ema":
        assert unread.max() == 0  # written only where read
    else:  # back-propagation moves the rows read; the others only shrink by the optimizer's weight decay
        assert unread.max() < read.min()
    loaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ft" / "seed1" / "model"))
    assert type(loaded).__name__ == "ElectraForSequenceClassification"
