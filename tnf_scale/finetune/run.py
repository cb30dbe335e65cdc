"""Fine-tune an exported model on a task over several seeds with the Hugging Face Trainer, evaluating every epoch;
report each seed's score, the mean and the standard deviation."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from deepspeed.accelerator import get_accelerator
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.training_args import ParallelMode

from tnf_scale.errors import ConfigError
from tnf_scale.finetune.notes import (
    OCCURRENCE_COLUMNS,
    VARIANTS,
    NotedClassifier,
    NotedCollator,
    NoteSource,
    check_notes_belong,
    occurrence_finder,
)
from tnf_scale.finetune.scores import score
from tnf_scale.finetune.tasks import TaskData
from tnf_scale.settings import setting


@dataclass
class FinetuneArgs:
    """Fine-tuning: the usual knobs (BERT's paper: lr in 2e-5..5e-5, 2-4 epochs, batch 16 or 32)."""

    model: str = setting(help="a model directory with its tokenizer (a run's export/, any BERT)", flag="DIR")
    out: str = setting(help="where the scores and the report go", flag="DIR")
    seeds: list[int] = setting(
        factory=lambda: [1, 2, 3], help="one fine-tuning per seed; the report gives mean and spread"
    )
    lr: float = setting(2e-5, help="peak learning rate")
    epochs: float = setting(3.0, help="training epochs (evaluated after each)")
    batch_size: int = setting(32, help="examples per step")
    max_seq_len: int = setting(128, help="tokens per example, at most the model's positions")
    warmup_ratio: float = setting(0.1, help="share of the steps of linear warm-up")
    weight_decay: float = setting(0.01, help="AdamW's decoupled weight decay")
    max_train_examples: int | None = setting(None, help="use only the first N training examples (a quick look)")
    max_eval_examples: int | None = setting(
        None, help="score only the first N validation examples (a quick look; the report says so)"
    )
    notes: Literal[VARIANTS] = setting(
        "none",
        help="none: the exported plain model; ema (TNF-F): the run's notes mixed into rare spans and updated by the "
        "EMA rule while fine-tuning; learned (TNF-U): the note rows trained by back-propagation",
    )
    run: str | None = setting(
        None,
        help="the pre-training run whose notes ema/learned read (none: --model's parent, e.g. RUN for RUN/export)",
        flag="DIR",
    )
    save_models: bool = setting(False, help="save each seed's fine-tuned model (with its notes) in OUT/seed<N>/model")


def check_model_dir(path: str) -> None:
    """One sentence when `path` is not a saved transformers model with its tokenizer."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"--model {folder} holds no config.json; point it at a model directory (a run's export/, or any "
            f"saved BERT)."
        )
    try:
        AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"--model {folder} is not a transformers model directory ({err}); point it at a run's export/."
        ) from None
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in weights):
        raise ConfigError(
            f"--model {folder} has a config.json but no weights (model.safetensors); export the run again "
            "(python tools/export.py --run RUN)."
        )


def tokenize(task: TaskData, tokenizer, max_seq_len: int, source: NoteSource | None):
    """Both splits as model inputs; with a note source, also each example's rare occurrences."""
    spec = task.spec
    find = occurrence_finder(tokenizer, source.rare_id_of) if source else None

    def encode(batch):
        pair = batch[spec.text_pair_column] if spec.text_pair_column else None
        encodings = tokenizer(batch[spec.text_column], pair, truncation=True, max_length=max_seq_len)
        return {**encodings, **(find(encodings, batch[spec.text_column], pair) if find else {})}

    keep = ("input_ids", "token_type_ids", "attention_mask", "labels", *OCCURRENCE_COLUMNS)
    encoded = [split.map(encode, batched=True) for split in (task.train, task.validation)]
    return [split.remove_columns([c for c in split.column_names if c not in keep]) for split in encoded]


def metric_scores(task: TaskData, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predictions = logits.squeeze(-1) if task.spec.regression else logits.argmax(-1)
    return {metric: score(metric, predictions, labels) for metric in task.spec.metrics}


def finetune_seed(
    task: TaskData, args: FinetuneArgs, seed: int, train, validation, tokenizer, source: NoteSource | None
) -> list[dict[str, float]]:
    """One seed: a fresh classifier head on the model (reading notes with a source), trained and evaluated each epoch;
    the per-epoch scores."""
    set_seed(seed)  # the new head's initialisation depends on the seed
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=task.num_labels, problem_type="regression" if task.spec.regression else None
    )
    training = TrainingArguments(
        output_dir=str(Path(args.out) / f"seed{seed}"),
        seed=seed,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.warmup_ratio,  # a float below 1: a share of the steps
        weight_decay=args.weight_decay,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        use_cpu=get_accelerator().device_name() == "cpu",
        remove_unused_columns=False,  # tokenize kept only what the model takes
    )
    on_one_device(training)
    if source is not None:
        model = NotedClassifier(model, source, args.notes, training.device)
    epochs: list[dict[str, float]] = []

    def compute_metrics(prediction) -> dict[str, float]:
        scores = metric_scores(task, prediction.predictions, prediction.label_ids)
        epochs.append(scores)
        return scores

    collator = NotedCollator(tokenizer) if source is not None else DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )
    trainer.train()
    if args.save_models:
        folder = Path(args.out) / f"seed{seed}" / "model"
        model.save(folder) if source is not None else model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    return epochs


def on_one_device(training: TrainingArguments) -> None:
    """Fine-tune on one device when the process is not one rank of a distributed launch. On a node with several GPUs
    the Trainer would otherwise wrap the model in nn.DataParallel, which splits the per-occurrence note tensors of a
    batch apart from its samples and runs the note hooks concurrently; several GPUs are for `deepspeed`/`torchrun`
    launches, where each rank has its own. (`_n_gpu` is the count the Trainer consults; transformers has no public
    setting for it.)"""
    if training.n_gpu > 1 and training.parallel_mode == ParallelMode.NOT_DISTRIBUTED:
        training._n_gpu = 1


def summarize(task: TaskData, per_seed: dict[int, list[dict[str, float]]]) -> dict:
    """Each seed's final-epoch scores (no selection on the validation set), and their mean and standard deviation."""
    final = {seed: epochs[-1] for seed, epochs in per_seed.items()}
    summary = {}
    for metric in task.spec.metrics:
        values = [scores[metric] for scores in final.values()]
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return {
        "task": task.spec.name,
        "metrics": list(task.spec.metrics),
        "final": final,
        "epochs": per_seed,
        "summary": summary,
        "majority_class": majority_share(task),
    }


def majority_share(task: TaskData) -> float | None:
    """The validation accuracy of always predicting the train split's most common class (None for regression)."""
    if task.spec.regression:
        return None
    counts = np.bincount(np.asarray(task.train["labels"]), minlength=task.num_labels)
    return float(np.mean(np.asarray(task.validation["labels"]) == counts.argmax()))


def markdown(result: dict, args: FinetuneArgs) -> str:
    metrics = result["metrics"]
    rows = [
        f"# Fine-tuning {args.model} on {result['task']}",
        "",
        f"notes {args.notes}; lr {args.lr}, {args.epochs:g} epochs, batch {args.batch_size}, max "
        f"{args.max_seq_len} tokens; "
        f"{len_note(args)}the final epoch's validation scores (no selection on the validation set).",
        "",
        "| seed | " + " | ".join(metrics) + " |",
        "| --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    rows += [
        f"| {seed} | " + " | ".join(f"{scores[m]:.4f}" for m in metrics) + " |"
        for seed, scores in result["final"].items()
    ]
    rows.append(
        "| mean ± std | "
        + " | ".join(f"{result['summary'][m]['mean']:.4f} ± {result['summary'][m]['std']:.4f}" for m in metrics)
        + " |"
    )
    if result["majority_class"] is not None:
        rows += ["", f"Majority class on the validation split: accuracy {result['majority_class']:.4f}."]
    return "\n".join(rows) + "\n"


def len_note(args: FinetuneArgs) -> str:
    parts = [
        f"first {n} {name} examples"
        for n, name in ((args.max_train_examples, "training"), (args.max_eval_examples, "validation"))
        if n
    ]
    return f"{' and '.join(parts)} only; " if parts else ""


def check_settings(args: FinetuneArgs) -> None:
    """Every setting that can be checked before a task is loaded: at least one seed, positive finite rates and sizes,
    a note variant, the model directory."""
    if not args.seeds:
        raise ConfigError("fine-tuning needs at least one --seeds value.")
    for flag in ("epochs", "lr", "batch_size", "max_seq_len", "max_train_examples", "max_eval_examples"):
        value = getattr(args, flag)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--{flag} must be positive, got {value}.")
    if args.notes not in VARIANTS:
        raise ConfigError(f"--notes {args.notes} is not a variant; choose one of {', '.join(VARIANTS)}.")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if args.notes == "ema" and ranks > 1:
        raise ConfigError(
            f"--notes ema on {ranks} ranks would let each rank's notes drift apart (each writes its own batches into "
            "its own copy); fine-tune TNF-F's ema notes in one process (python tools/finetune.py), or use --notes "
            "learned, whose notes the ranks' gradient all-reduce keeps equal."
        )
    check_model_dir(args.model)
    positions = AutoConfig.from_pretrained(args.model).max_position_embeddings
    if args.max_seq_len > positions:
        raise ConfigError(
            f"--max_seq_len {args.max_seq_len} exceeds the {positions} positions of --model {args.model}; pass "
            f"--max_seq_len {positions} or less (or continue pre-training at the longer length, docs/recipe.md)."
        )
    if args.notes != "none":
        check_notes_belong(args.model, args.run or Path(args.model).parent)


def finetune(task: TaskData, args: FinetuneArgs) -> dict:
    """Fine-tune `args.model` on `task` once per seed; writes finetune.json and finetune.md into `args.out`."""
    check_settings(args)
    if args.max_train_examples is not None:
        task.train = task.train.select(range(min(args.max_train_examples, len(task.train))))
    if args.max_eval_examples is not None:
        task.validation = task.validation.select(range(min(args.max_eval_examples, len(task.validation))))
    source = NoteSource.from_run(args.run or Path(args.model).parent) if args.notes != "none" else None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train, validation = tokenize(task, tokenizer, args.max_seq_len, source)
    per_seed = {seed: finetune_seed(task, args, seed, train, validation, tokenizer, source) for seed in args.seeds}
    result = summarize(task, per_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps({**result, "args": vars(args)}, indent=1) + "\n")
    (out / "finetune.md").write_text(markdown(result, args))
    return result
