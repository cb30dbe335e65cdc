"""Downstream tasks: which columns hold the text and the label, which metric scores it, and where its splits come from
(GLUE on the Hugging Face hub, the task shipped with the set-up, or files the user names)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import datasets

from tnf_scale.data.corpus import rows_not_text
from tnf_scale.errors import ConfigError
from tnf_scale.finetune.scores import METRICS, REGRESSION_METRICS

GLUE_HUB = "nyu-mll/glue"
FILE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass(frozen=True)
class TaskSpec:
    """What a task's examples look like and how it is scored (the first metric is the headline)."""

    name: str
    text_column: str
    text_pair_column: str | None
    label_column: str
    metrics: tuple[str, ...]
    validation_split: str = "validation"

    @property
    def regression(self) -> bool:
        return self.metrics[0] in REGRESSION_METRICS


GLUE = {
    "cola": TaskSpec("cola", "sentence", None, "label", ("matthews", "accuracy")),
    "sst2": TaskSpec("sst2", "sentence", None, "label", ("accuracy",)),
    "mrpc": TaskSpec("mrpc", "sentence1", "sentence2", "label", ("f1", "accuracy")),
    "qqp": TaskSpec("qqp", "question1", "question2", "label", ("f1", "accuracy")),
    "stsb": TaskSpec("stsb", "sentence1", "sentence2", "label", ("pearson", "spearman")),
    "mnli": TaskSpec("mnli", "premise", "hypothesis", "label", ("accuracy",), "validation_matched"),
    "qnli": TaskSpec("qnli", "question", "sentence", "label", ("accuracy",)),
    "rte": TaskSpec("rte", "sentence1", "sentence2", "label", ("accuracy",)),
}


@dataclass
class TaskData:
    """A task's train and validation splits with labels as model targets (class ids, or floats for regression)."""

    spec: TaskSpec
    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list[str] | None  # class names by id; None for regression

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


def read_file(path: str) -> datasets.Dataset:
    """One local csv/tsv/jsonl/json/parquet file as a Dataset; a missing or unreadable file is one sentence."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; name a .csv, .tsv, .jsonl or .parquet file.")
    if file.suffix.lower() not in FILE_FORMATS:
        raise ConfigError(f"{file} has a suffix tnf_scale does not read; use one of {', '.join(FILE_FORMATS)}.")
    builder, options = FILE_FORMATS[file.suffix.lower()]
    if builder != "parquet" and len(
        [line for line in file.read_text(errors="replace").splitlines() if line.strip()]
    ) <= (builder == "csv"):
        raise ConfigError(f"{file} holds no examples; give it at least one row.")
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", **options)
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as err:
        raise ConfigError(f"{file} could not be read as {builder} ({type(err).__name__}); check its format.") from None


def check_columns(split: datasets.Dataset, spec: TaskSpec, where: str) -> None:
    if len(split) == 0:
        raise ConfigError(f"the {where} split is empty; give it examples.")
    for flag, column in (
        ("--text_column", spec.text_column),
        ("--text_pair_column", spec.text_pair_column),
        ("--label_column", spec.label_column),
    ):
        if column is not None and column not in split.column_names:
            raise ConfigError(
                f"{flag} {column} is not a column of the {where} split; its columns are "
                f"{', '.join(split.column_names)}."
            )
    for flag, column in (("--text_column", spec.text_column), ("--text_pair_column", spec.text_pair_column)):
        rows = rows_not_text(split[column]) if column is not None else None
        if rows:
            raise ConfigError(
                f"{flag} {column} of the {where} split holds no text in {rows}; give those examples text or drop them."
            )


def is_number(value) -> bool:
    """A label a regression can take: a number, or a string holding one."""
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def encode_labels(
    train: datasets.Dataset, validation: datasets.Dataset, spec: TaskSpec
) -> tuple[datasets.Dataset, datasets.Dataset, list[str] | None]:
    """Labels as the model wants them: floats for regression; else class ids, from the train split's sorted label set
    (strings or numbers), which the validation split must not exceed."""
    column = spec.label_column
    for split, where in ((train, "train"), (validation, "validation")):
        missing = sum(v is None for v in split[column])
        if missing:
            raise ConfigError(
                f"{missing} examples of the {where} split have no label (null in {column!r}); drop them or label them."
            )
    if spec.regression:
        for split, where in ((train, "train"), (validation, "validation")):
            bad = next((v for v in split[column] if not is_number(v)), None)
            if bad is not None:
                raise ConfigError(
                    f"--metric {spec.metrics[0]} scores a regression, but the {where} split's label {bad!r} is not a "
                    "number; use --metric accuracy (or f1, matthews) for classes."
                )

        def as_float(batch):
            return {"labels": [float(v) for v in batch[column]]}

        return train.map(as_float, batched=True), validation.map(as_float, batched=True), None
    found = {str(v) for v in train[column]}
    numeric = all(v.lstrip("-").isdigit() for v in found)
    names = sorted(found, key=int) if numeric else sorted(found)
    unseen = sorted({str(v) for v in validation[column]} - set(names))
    if unseen:
        raise ConfigError(
            f"the validation split has labels the train split lacks ({', '.join(unseen[:5])}); "
            "give both splits the same label set."
        )
    if len(names) < 2:
        raise ConfigError(f"the train split has a single label ({names[0]}); a classifier needs at least two.")
    ids = {name: i for i, name in enumerate(names)}

    def as_id(batch):
        return {"labels": [ids[str(v)] for v in batch[column]]}

    return train.map(as_id, batched=True), validation.map(as_id, batched=True), names


def load_task(spec: TaskSpec, train: datasets.Dataset, validation: datasets.Dataset) -> TaskData:
    """Check both splits against the spec and encode their labels."""
    check_columns(train, spec, "train")
    check_columns(validation, spec, "validation")
    train, validation, names = encode_labels(train, validation, spec)
    return TaskData(spec, train, validation, names)


def glue_task(name: str) -> TaskData:
    """A GLUE task from the hub (needs the network, or a datasets cache that holds it)."""
    spec = GLUE[name]
    try:
        glue = datasets.load_dataset(GLUE_HUB, name)
    except (OSError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        raise ConfigError(
            f"GLUE task {name} could not be loaded from the hub ({type(err).__name__}: offline?); fetch it once on a "
            f"machine with network (python -c \"import datasets; datasets.load_dataset('{GLUE_HUB}', '{name}')\"), "
            "which fills the datasets cache this run reads, or give --train and --validation files."
        ) from None
    return load_task(spec, glue["train"], glue[spec.validation_split])


def file_task(
    train: str,
    validation: str,
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    metric: str,
    name: str | None = None,
) -> TaskData:
    """A task from local files (the shipped task is one); named after the train file unless `name` is given."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric} is not one tnf_scale computes; choose one of {', '.join(METRICS)}.")
    others = tuple(
        m
        for m in (("spearman",) if metric == "pearson" else ("pearson",) if metric == "spearman" else ("accuracy",))
        if m != metric
    )
    spec = TaskSpec(name or Path(train).stem, text_column, text_pair_column, label_column, (metric, *others))
    return load_task(spec, read_file(train), read_file(validation))
