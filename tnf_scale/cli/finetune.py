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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory with its tokenizer")
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
    parser.add_argument("--out", required=True)
    defaults = FinetuneArgs(model="", out="")  # the one source of the fine-tuning defaults
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--max_seq_len", type=int, default=defaults.max_seq_len)
    parser.add_argument("--max_train_examples", type=int, help="use only the first N training examples (a quick look)")
    parser.add_argument(
        "--max_eval_examples", type=int, help="score only the first N validation examples (a quick look)"
    )
    parser.add_argument(
        "--notes",
        choices=("none", "ema", "learned"),
        default="none",
        help="none: the exported plain model; ema (TNF-F): the run's notes mixed into rare spans and updated by "
        "the EMA rule while fine-tuning; learned (TNF-U): the note rows trained by back-propagation",
    )
    parser.add_argument(
        "--run",
        help="the pre-training run whose notes ema/learned read (default: --model's parent, e.g. RUN for RUN/export)",
    )
    parser.add_argument(
        "--save_models",
        action="store_true",
        help="save each seed's fine-tuned model (with its notes) in OUT/seed<N>/model",
    )
    args = parser.parse_args(argv)

    def run() -> int:
        if bool(args.task) == bool(args.train or args.validation) or bool(args.train) != bool(args.validation):
            raise ConfigError("give --task NAME, or --train FILE with --validation FILE (and the column flags).")
        settings = FinetuneArgs(
            args.model,
            args.out,
            args.seeds,
            args.lr,
            args.epochs,
            args.batch_size,
            args.max_seq_len,
            max_train_examples=args.max_train_examples,
            max_eval_examples=args.max_eval_examples,
            notes=args.notes,
            run=args.run,
            save_models=args.save_models,
        )
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
