"""Fine-tune an exported model (a run's export/, any BERT directory) on GLUE, the shipped task or local files.

    python tools/finetune.py --model runs/demo/export --task rotten_tomatoes --seeds 1 2 3 --out runs/demo/ft_rt
    python tools/finetune.py --model runs/demo/export --task mrpc --out runs/demo/ft_mrpc          # GLUE, from the hub
    python tools/finetune.py --model runs/demo/export --train train.tsv --validation dev.tsv \\
        --text_column sentence1 --text_pair_column sentence2 --label_column label --metric f1 --out runs/demo/ft_local

The Hugging Face Trainer and AutoModelForSequenceClassification; evaluation every epoch; each seed's final-epoch
scores, their mean and standard deviation in --out/finetune.{json,md}.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tnf_scale.distributed import check_this_node
from tnf_scale.errors import CommandParser, ConfigError, exit_code
from tnf_scale.finetune.run import FinetuneArgs, check_settings, finetune, markdown
from tnf_scale.finetune.scores import METRICS
from tnf_scale.finetune.shipped import TASK as SHIPPED
from tnf_scale.finetune.shipped import task_dir
from tnf_scale.finetune.tasks import GLUE, GLUE_HUB, TaskData, file_task, glue_task
from tnf_scale.run_dir import check_out_dir
from tnf_scale.settings import add_flags, from_flags, setting

TASKS = (*GLUE, SHIPPED)


@dataclass
class TaskChoice:
    """The task: a GLUE task, the shipped one, or local files with their columns and metric."""

    task: Literal[TASKS] | None = setting(None, help=f"a GLUE task (hub {GLUE_HUB}) or the shipped {SHIPPED}")
    train: str | None = setting(None, help="local train file (.csv, .tsv, .jsonl, .parquet)", flag="FILE")
    validation: str | None = setting(None, help="local validation file", flag="FILE")
    text_column: str = setting("text", help="local files: the column of the text")
    text_pair_column: str | None = setting(None, help="local files: the column of the second text of a pair")
    label_column: str = setting("label", help="local files: the column of the label")
    metric: Literal[METRICS] = setting(
        "accuracy", help="local files: how the task is scored (pearson and spearman: a regression)"
    )
    data_cache: str = setting(".cache/tnf_data", help="where the set-up put the shipped task", flag="DIR")


def load_task(choice: TaskChoice) -> TaskData:
    """The chosen task's splits: from the hub (GLUE), the set-up's cache (the shipped task) or local files."""
    if choice.task in GLUE:
        return glue_task(choice.task)
    shipped = task_dir(choice.data_cache)
    train, validation = (
        (choice.train, choice.validation)
        if choice.train
        else (str(shipped / "train.jsonl"), str(shipped / "validation.jsonl"))
    )
    if choice.task == SHIPPED and not Path(train).is_file():
        raise ConfigError(
            f"the shipped task is not in {shipped}; run `python -m tnf_scale.finetune.shipped` (make install does)."
        )
    return file_task(
        train, validation, choice.text_column, choice.text_pair_column, choice.label_column, choice.metric, choice.task
    )


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__.splitlines()[0])
    add_flags(parser, TaskChoice)
    add_flags(parser, FinetuneArgs)
    args = parser.parse_args(argv)

    def run() -> int:
        check_this_node()
        choice, settings = from_flags(TaskChoice, args), from_flags(FinetuneArgs, args)
        if choice.task is not None and choice.task not in TASKS:
            raise ConfigError(f"--task {choice.task} is not one tnf_scale knows; choose one of {', '.join(TASKS)}.")
        if bool(choice.task) == bool(choice.train or choice.validation) or bool(choice.train) != bool(
            choice.validation
        ):
            raise ConfigError("give --task NAME, or --train FILE with --validation FILE (and the column flags).")
        check_settings(settings)  # before a task is loaded
        check_out_dir(settings.out, "--out")
        print(markdown(finetune(load_task(choice), settings), settings))
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
