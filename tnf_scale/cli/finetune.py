"""Fine-tune an exported model (a run's export/, any BERT directory) on GLUE, the shipped task or local files.

    python tools/finetune.py --model runs/demo/export --task rotten_tomatoes --seeds 1 2 3 --out runs/demo/ft_rt
    python tools/finetune.py --model runs/demo/export --task mrpc --out runs/demo/ft_mrpc          # GLUE, from the hub
    python tools/finetune.py --model runs/demo/export --train train.tsv --validation dev.tsv \\
        --text_column sentence1 --text_pair_column sentence2 --label_column label --metric f1 --out runs/demo/ft_local

The Hugging Face Trainer and AutoModelForSequenceClassification; evaluation every epoch; each seed's final-epoch
scores, their mean and standard deviation in --out/finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tnf_scale.errors import ConfigError, exit_code
from tnf_scale.finetune.run import FinetuneArgs, check_settings, finetune, markdown
from tnf_scale.finetune.shipped import TASK as SHIPPED
from tnf_scale.finetune.shipped import task_dir
from tnf_scale.finetune.tasks import GLUE, file_task, glue_task
from tnf_scale.run_dir import check_out_dir
from tnf_scale.settings import add_flags, fields_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=[*GLUE, SHIPPED], help=f"a GLUE task (hub {'nyu-mll/glue'}) or the shipped {SHIPPED}"
    )
    parser.add_argument("--train", help="local train file (.csv, .tsv, .jsonl, .parquet)")
    parser.add_argument("--validation", help="local validation file")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--text_pair_column")
    parser.add_argument("--label_column", default="label")
    parser.add_argument(
        "--metric", default="accuracy", help="accuracy, f1, matthews, pearson or spearman (the last two: regression)"
    )
    parser.add_argument("--data_cache", default=".cache/tnf_data", help="where the set-up put the shipped task")
    add_flags(parser, FinetuneArgs)
    args = parser.parse_args(argv)

    def run() -> int:
        if bool(args.task) == bool(args.train or args.validation) or bool(args.train) != bool(args.validation):
            raise ConfigError("give --task NAME, or --train FILE with --validation FILE (and the column flags).")
        settings = FinetuneArgs(**{name: getattr(args, name) for name in fields_of(FinetuneArgs)
                                    if getattr(args, name) is not None})  # fmt: skip
        check_settings(settings)  # before a task is loaded
        check_out_dir(args.out, "--out")
        if args.task in GLUE:
            task = glue_task(args.task)
        else:
            train, validation = (
                (args.train, args.validation)
                if args.train
                else (
                    str(task_dir(args.data_cache) / "train.jsonl"),
                    str(task_dir(args.data_cache) / "validation.jsonl"),
                )
            )
            if args.task == SHIPPED and not Path(train).is_file():
                raise ConfigError(
                    f"the shipped task is not in {task_dir(args.data_cache)}; run `python -m "
                    f"tnf_scale.finetune.shipped` (make install does)."
                )
            task = file_task(
                train, validation, args.text_column, args.text_pair_column, args.label_column, args.metric, args.task
            )
        print(markdown(finetune(task, settings), settings))
        return 0

    return exit_code(run)


if __name__ == "__main__":
    sys.exit(main())
