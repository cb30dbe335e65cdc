"""Fine-tuning exports: metrics against hand-computed values, the shipped task, GLUE-shaped local files, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, save_random_bert, tokenizer_with_other_ids
from transformers import AutoModelForSequenceClassification

from tnf_scale.cli import finetune as finetune_tool
from tnf_scale.errors import ConfigError
from tnf_scale.finetune import shipped
from tnf_scale.finetune.notes import OCCURRENCE_COLUMNS, NotedClassifier, NotedCollator, NoteSource, occurrence_finder
from tnf_scale.finetune.run import FinetuneArgs, check_model_dir, check_settings, finetune
from tnf_scale.finetune.scores import score
from tnf_scale.finetune.tasks import GLUE, file_task

DATA_CACHE = REPO / ".cache" / "tnf_data"


@pytest.fixture(scope="session")
def shipped_task() -> Path:
    """The set-up's Rotten Tomatoes splits (`make install` builds them; built here when missing)."""
    return shipped.build(DATA_CACHE)


def test_metrics_match_hand_computed_values():
    predictions, labels = np.array([1, 0, 1, 1, 0, 1]), np.array([1, 0, 0, 1, 1, 1])
    # tp 3, fp 1, fn 1, tn 1
    assert score("accuracy", predictions, labels) == pytest.approx(4 / 6)
    assert score("f1", predictions, labels) == pytest.approx(2 * 3 / (4 + 4))
    assert score("matthews", predictions, labels) == pytest.approx((3 * 1 - 1 * 1) / np.sqrt(4 * 4 * 2 * 2))
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 4.0])
    # Pearson by hand: dx = -1.5,-.5,.5,1.5; dy = -1.75,.25,1.25,.25;
    # sum dxdy = 3.5; sum dx2 = 5; sum dy2 = 4.75
    assert score("pearson", x, y) == pytest.approx(3.5 / np.sqrt(5 * 4.75))
    # Spearman: ranks of y with the tie at 4 -> 1, 2.5, 4, 2.5
    assert score("spearman", x, y) == pytest.approx(
        score("pearson", np.array([1, 2, 3, 4.0]), np.array([1, 2.5, 4, 2.5]))
    )
    assert score("matthews", np.ones(4, dtype=int), np.array([1, 0, 1, 0])) == 0.0  # a constant prediction


def test_the_shipped_task_is_split_deterministically_by_text(shipped_task):
    rows = {split: [json.loads(line) for line in (shipped_task / f"{split}.jsonl").open()] for split in shipped.SPLITS}
    assert len(rows["train"]) > 9000 and len(rows["validation"]) > 1000 and len(rows["test"]) > 1000
    buckets = {0: "test", 1: "validation"}  # the documented rule: sha256 of the text mod 10, 0 test, 1 validation
    for split, examples in rows.items():
        for r in examples:
            bucket = int(hashlib.sha256(r["text"].encode("utf-8")).hexdigest(), 16) % 10
            assert buckets.get(bucket, "train") == split and r["label"] in ("fresh", "rotten"), r
    texts = [r["text"] for examples in rows.values() for r in examples]
    assert len(texts) == len(set(texts))  # no snippet in two splits


@pytest.mark.launcher
def test_a_tiny_export_fine_tuned_on_the_shipped_task_beats_the_majority_class(
    dp_reference_run, shipped_task, tmp_path
):
    out = tmp_path / "ft"
    assert (
        finetune_tool.main(
            [
                "--model",
                str(dp_reference_run / "export"),
                "--task",
                "rotten_tomatoes",
                "--data_cache",
                str(DATA_CACHE),
                "--seeds",
                "1",
                "--epochs",
                "3",
                "--lr",
                "1e-3",
                "--max_seq_len",
                "64",
                "--max_train_examples",
                "2400",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "finetune.json").read_text())
    assert result["task"] == "rotten_tomatoes" and len(result["epochs"]["1"]) == 3  # evaluated every epoch
    assert result["final"]["1"]["accuracy"] > result["majority_class"] + 0.03
    assert result["summary"]["accuracy"]["mean"] == result["final"]["1"]["accuracy"]
    assert "| mean ± std |" in (out / "finetune.md").read_text()


@pytest.fixture(scope="module")
def random_bert(prepared, tmp_path_factory) -> Path:
    """A stock BERT directory with the test tokenizer: any model directory fine-tunes, not only our exports."""
    return save_random_bert(
        prepared.tokenizer, tmp_path_factory.mktemp("bert"), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64,
    )  # fmt: skip


def write_tsv(path: Path, header: list[str], rows: list[list]) -> str:
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n")
    return str(path)


def test_glue_shaped_pair_and_regression_files_fine_tune(random_bert, tmp_path):
    pairs = [["the cat sat", "a cat was sitting", 1], ["it rained", "the sun shone", 0]] * 8
    mrpc = file_task(
        write_tsv(tmp_path / "mrpc_train.tsv", ["sentence1", "sentence2", "label"], pairs),
        write_tsv(tmp_path / "mrpc_dev.tsv", ["sentence1", "sentence2", "label"], pairs[:4]),
        "sentence1",
        "sentence2",
        "label",
        "f1",
    )
    assert mrpc.spec.text_pair_column == GLUE["mrpc"].text_pair_column == "sentence2" and mrpc.label_names == ["0", "1"]
    # two pairs, each repeated: a model that reads the files right learns them; the scores are of the dev file's
    learned = dict(epochs=20, lr=1e-3, batch_size=8, warmup_ratio=0.0)
    result = finetune(mrpc, FinetuneArgs(str(random_bert), str(tmp_path / "mrpc"), seeds=[1, 2], **learned))
    assert set(result["final"]) == {1, 2} and set(result["summary"]) == {"f1", "accuracy"}
    assert all(result["final"][seed] == {"f1": 1.0, "accuracy": 1.0} for seed in (1, 2)), result["final"]

    scored = [["a man plays", "a man is playing", 4.8], ["a dog runs", "the market fell", 0.2]] * 8
    stsb = file_task(
        write_tsv(tmp_path / "stsb_train.tsv", ["sentence1", "sentence2", "score"], scored),
        write_tsv(tmp_path / "stsb_dev.tsv", ["sentence1", "sentence2", "score"], scored[:4]),
        "sentence1",
        "sentence2",
        "score",
        "pearson",
    )
    assert stsb.spec.regression and stsb.num_labels == 1 and stsb.train["labels"][:2] == [4.8, 0.2]
    longer = dict(learned, epochs=60)  # measured: 20 epochs leave the two predictions in either order
    result = finetune(stsb, FinetuneArgs(str(random_bert), str(tmp_path / "stsb"), seeds=[1], **longer))
    assert set(result["summary"]) == {"pearson", "spearman"} and result["majority_class"] is None
    assert result["final"][1]["pearson"] == pytest.approx(1.0), result["final"]  # the higher score, predicted higher


def test_string_labels_are_mapped_from_the_train_split(tmp_path):
    rows = [{"review": "good", "verdict": "fresh"}, {"review": "bad", "verdict": "rotten"}]
    train, dev = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    for path in (train, dev):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = file_task(str(train), str(dev), "review", None, "verdict", "accuracy")
    assert task.label_names == ["fresh", "rotten"] and task.validation["labels"] == [0, 1]


def write_csv(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_bad_fine_tuning_input_is_one_sentence(random_bert, tmp_path, capsys):
    good = write_tsv(tmp_path / "good.tsv", ["text", "label"], [["fine", 1], ["poor", 0]])
    cases = [
        (
            dict(train=good, validation=write_tsv(tmp_path / "other.tsv", ["text", "label"], [["odd", 7]])),
            "labels the train split lacks \\(7\\)",
        ),
        (
            dict(train=good, validation=write_tsv(tmp_path / "empty.tsv", ["text", "label"], [])),
            "empty.tsv holds no examples",
        ),
        (
            dict(train=good, validation=good, label_column="gold"),
            "--label_column gold is not a column of the train split; its columns are text, label",
        ),
        (dict(train=str(tmp_path / "nope.csv"), validation=good), "nope.csv does not exist"),
        (
            dict(train=write_csv(tmp_path / "blank.csv", "text,label\nfine,1\n,0\npoor,0\n"), validation=good),
            "--text_column text of the train split holds no text in row 2 \\(nothing there\\); give those",
        ),
        (dict(train=good, validation=good, metric="bleu"), "--metric bleu is not one tnf_scale computes"),
    ]
    for kwargs, message in cases:
        args = {
            "text_column": "text",
            "text_pair_column": None,
            "label_column": "label",
            "metric": "accuracy",
            **kwargs,
        }
        with pytest.raises(ConfigError, match=message):
            file_task(**args)
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_model_dir(str(tmp_path))
    with pytest.raises(
        ConfigError, match="--max_seq_len 600 exceeds the 512 positions of --model .* pass --max_seq_len"
    ):
        check_settings(FinetuneArgs(str(random_bert), str(tmp_path / "o"), max_seq_len=600))
    baseline, tnf = tmp_path / "baseline", tmp_path / "tnf"
    for run in (baseline, tnf):
        (run / "run_config.json").parent.mkdir()
        (run / "run_config.json").write_text("{}")
    shutil.copytree(random_bert, baseline / "export")
    with pytest.raises(ConfigError, match=f"--model {baseline / 'export'} was exported from run {baseline}, not from"):
        check_settings(FinetuneArgs(str(baseline / "export"), str(tmp_path / "o"), notes="learned", run=str(tnf)))
    (tnf / "model_config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="was not trained by --run .* \\(hidden size 32, the notes' 64\\)"):
        check_settings(FinetuneArgs(str(random_bert), str(tmp_path / "o"), notes="learned", run=str(tnf)))
    (tnf / "model_config.json").write_text(json.dumps({"hidden_size": 32}))
    tokenizer_with_other_ids(tnf / "tokenizer")
    with pytest.raises(ConfigError, match="was not trained by --run .* \\(another tokenizer\\)"):
        check_settings(FinetuneArgs(str(random_bert), str(tmp_path / "o"), notes="learned", run=str(tnf)))
    assert (
        finetune_tool.main(
            ["--model", str(tmp_path), "--train", good, "--validation", good, "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "holds no config.json" in capsys.readouterr().err


def note_source(tmp_path: Path, words: list[str], dim: int = 32) -> NoteSource:
    vocab = tmp_path / "rare_vocab.tsv"
    vocab.write_text("# rare band 2..5\nword\tid\tcount\n" + "".join(f"{w}\t{i}\t3\n" for i, w in enumerate(words)))
    return NoteSource(torch.randn(len(words), dim), vocab, lam=0.5, gamma=0.1, window=4)


def test_rare_spans_are_found_in_both_sentences_and_only_whole_words_count(prepared):
    tokenizer = prepared.tokenizer
    find = occurrence_finder(tokenizer, {"jerusalem": 0, "anarchism": 1})
    texts, pairs = ["In Jerusalem today"], ["anarchism and Jerusalem"]
    encodings = tokenizer(texts, pairs, truncation=True, max_length=64)
    found = find(encodings, texts, pairs)
    tokens = encodings.tokens(0)
    spans = [
        (r, "".join(t.removeprefix("##") for t in tokens[a : b + 1]))
        for r, a, b in zip(found["rare_ids"][0], found["span_start"][0], found["span_end"][0])
    ]
    assert sorted(spans) == [(0, "jerusalem"), (0, "jerusalem"), (1, "anarchism")]
    # "jerusalem" is 5 word pieces here; cut two of them off the end of the pair: that occurrence no longer counts
    cut = tokenizer(texts, pairs, truncation="only_second", max_length=len(tokens) - 2)
    assert cut.tokens(0)[-4:] == ["je", "##ru", "##s", "[SEP]"]
    assert sorted(find(cut, texts, pairs)["rare_ids"][0]) == [0, 1]


def noted_batch(tokenizer, source: NoteSource, texts: list[str]) -> dict[str, torch.Tensor]:
    encodings = tokenizer(texts, truncation=True, max_length=32)
    found = occurrence_finder(tokenizer, source.rare_id_of)(encodings, texts, None)
    features = [
        {
            "input_ids": encodings["input_ids"][i],
            "attention_mask": encodings["attention_mask"][i],
            "labels": i % 2,
            **{c: found[c][i] for c in OCCURRENCE_COLUMNS},
        }
        for i in range(len(texts))
    ]
    return NotedCollator(tokenizer)(features)


def test_the_ema_variant_updates_read_notes_only_while_training(random_bert, prepared, tmp_path):
    source = note_source(tmp_path, ["jerusalem", "anarchism", "albedo"])
    model = NotedClassifier(
        AutoModelForSequenceClassification.from_pretrained(str(random_bert), num_labels=2), source, "ema"
    )
    batch = noted_batch(prepared.tokenizer, source, ["Jerusalem was old", "anarchism is a theory and Jerusalem a city"])
    before = model.note_rows().clone()
    model.eval()
    model(**batch)
    assert torch.equal(model.note_rows(), before)  # evaluation reads, never writes
    model.train()
    out = model(**batch)
    assert out.loss is not None
    changed = (model.note_rows() != before).any(dim=1)
    assert changed.tolist() == [True, True, False]  # the words read, not albedo
    plain = AutoModelForSequenceClassification.from_pretrained(str(random_bert), num_labels=2).eval()
    mixed = NotedClassifier(
        AutoModelForSequenceClassification.from_pretrained(str(random_bert), num_labels=2), source, "ema"
    ).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    assert not torch.allclose(mixed(**batch).logits, plain(**inputs).logits)  # the notes reach the classifier


def test_the_learned_variant_trains_its_notes_and_reloads_with_them(random_bert, prepared, tmp_path):
    source = note_source(tmp_path, ["jerusalem", "anarchism", "albedo"])
    model = NotedClassifier(
        AutoModelForSequenceClassification.from_pretrained(str(random_bert), num_labels=2), source, "learned"
    )
    batch = noted_batch(prepared.tokenizer, source, ["Jerusalem was old", "anarchism is a theory"])
    model.train()
    model(**batch).loss.backward()
    grad = model.notes.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and grad[2].abs().sum() == 0
    with torch.no_grad():
        model.notes[0] += 1.0  # a learned change that must survive save and load
    model.save(tmp_path / "saved")
    again = NotedClassifier.load(tmp_path / "saved").eval()
    assert again.variant == "learned" and torch.equal(again.note_rows(), model.note_rows())
    model.eval()
    assert torch.allclose(again(**batch).logits, model(**batch).logits)


def test_the_none_variant_saves_a_stock_classifier(random_bert, tmp_path):
    rows = [["good fun", "fresh"], ["dull mess", "rotten"]] * 8
    task = file_task(
        write_tsv(tmp_path / "t.tsv", ["text", "label"], rows),
        write_tsv(tmp_path / "v.tsv", ["text", "label"], rows[:4]),
        "text",
        None,
        "label",
        "accuracy",
    )
    finetune(
        task, FinetuneArgs(str(random_bert), str(tmp_path / "ft"), seeds=[1], epochs=1, batch_size=8, save_models=True)
    )
    saved = tmp_path / "ft" / "seed1" / "model"
    assert not (saved / "tnf_notes.safetensors").exists()
    model = AutoModelForSequenceClassification.from_pretrained(str(saved))
    assert (
        type(model).__name__ == "BertForSequenceClassification"
        and not model.bert.embeddings.LayerNorm._forward_pre_hooks
    )


def test_time_to_score_finds_tnf_s_first_checkpoint_at_the_baseline_s_final_score():
    from tnf_scale.reports.downstream import time_to_score

    def rows(scores):
        return [
            {"step": step, "metrics": ["accuracy"], "summary": {"accuracy": {"mean": m, "std": 0.01}}}
            for step, m in scores
        ]

    result = time_to_score(
        rows([(250, 0.60), (500, 0.66), (1000, 0.70)]), rows([(250, 0.64), (500, 0.71), (1000, 0.73)])
    )
    assert result["target"] == 0.70 and result["tnf_step"] == 500 and result["saving"] == pytest.approx(0.5)
    assert "a saving of 50% in steps (short of the paper's 60%)" in result["verdict"]
    never = time_to_score(rows([(500, 0.66), (1000, 0.70)]), rows([(500, 0.60), (1000, 0.695)]))
    assert never["tnf_step"] is None and "no downstream saving" in never["verdict"]
    assert never["gap_at_last_step"] == pytest.approx(-0.005) and never["seed_spread_at_last_step"] == 0.01
    assert "within the spread, so not told from noise" in never["verdict"]  # -0.005 against a std of 0.01
    assert "larger than the spread" in result["verdict"]  # +0.03 against 0.01


def test_fine_tuning_outside_a_launch_uses_one_device(tmp_path, monkeypatch):
    """On a node with several GPUs the Trainer would wrap the model in nn.DataParallel (its n_gpu > 1), splitting the
    note tensors apart from their samples: a process that is not a rank of a launch fine-tunes on one device."""
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    from tnf_scale.finetune.run import on_one_device

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    _ = args.device
    args._n_gpu = 4  # what the Trainer reads on a 4-GPU node
    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.NOT_DISTRIBUTED))
    on_one_device(args)
    assert args.n_gpu == 1
    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.DISTRIBUTED))
    args._n_gpu = 4
    on_one_device(args)  # a rank of a distributed launch: the launch decides
    assert args.n_gpu == 4


def test_ema_notes_live_on_the_device_the_trainer_trains_on(random_bert, tmp_path, monkeypatch):
    """The ema store is no module state, so the Trainer's move of the model leaves it where it was built: it is built
    on the Trainer's device, not on the accelerator's current one, which under a distributed launch is cuda:0 on
    every rank until the Trainer sets the device (planted: the accelerator's current device, here standing in as
    `meta`, fails the fine-tune)."""
    from types import SimpleNamespace

    from tnf_scale.notes import store

    source = note_source(tmp_path, ["cat", "sun"])
    monkeypatch.setattr(NoteSource, "from_run", classmethod(lambda cls, run: source))
    monkeypatch.setattr(store, "get_accelerator", lambda: SimpleNamespace(current_device_name=lambda: "meta"))
    rows = [["the cat sat", 1], ["the sun shone", 0]] * 4
    task = file_task(
        write_tsv(tmp_path / "train.tsv", ["text", "label"], rows),
        write_tsv(tmp_path / "dev.tsv", ["text", "label"], rows[:2]),
        "text",
        None,
        "label",
        "accuracy",
    )
    args = FinetuneArgs(str(random_bert), str(tmp_path / "ft"), seeds=[1], epochs=1, batch_size=4, notes="ema")
    assert set(finetune(task, args)["final"]) == {1}


def test_ema_notes_are_refused_under_a_distributed_launch(random_bert, tmp_path, monkeypatch, capsys):
    """Each rank would write its own batches into its own copy of the notes: refused before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "ft"
    argv = ["--model", str(random_bert), "--task", "rotten_tomatoes", "--notes", "ema", "--out", str(out)]
    assert finetune_tool.main(argv) == 2
    assert "--notes ema on 2 ranks would let each rank's notes drift apart" in capsys.readouterr().err
    assert not out.exists()
