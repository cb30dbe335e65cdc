"""The steps of the GPU check, in the order that gives the most for the minutes a lent GPU may last: facts, the
binding, one-process device checks, the NCCL steps, the sync census, BERT-large in bf16 with TNF off and on, resume
against the noise floor, ZeRO-3, fused Adam, 2 ranks (data parallel, the universal form, 2 pipeline stages),
fine-tuning, ELECTRA-Base last."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from tnf_scale.node_check.runner import Job, Step


@dataclass(frozen=True)
class Sizes:
    """How big each run is: a real check, or a dry run at the smallest size."""

    large: str
    electra: str
    steps: int  # steps of a timed run
    log_interval: int
    warmup: int  # steps the throughput report leaves out
    batch: tuple[str, ...]  # global and micro-batch flags of the timed runs
    finetune_examples: tuple[int, int]  # train, validation

    @classmethod
    def of(cls, dry: bool) -> Sizes:
        if dry:
            return cls(
                "tiny", "electra-tiny", 6, 2, 2, ("--global_batch_size", "32", "--micro_batch_size", "16"), (64, 32)
            )
        return cls(
            "bert-large",
            "electra-base",
            60,
            10,
            20,
            ("--global_batch_size", "256", "--micro_batch_size", "64"),
            (2048, 512),
        )


TWO_GPUS = "needs 2 GPUs (NCCL refuses two ranks on one device)"


def plan(out: Path, dry: bool, gpus: int, python: str, bin_dir: Path, port: int) -> tuple[list[Job], list[Step]]:
    """The background jobs (started at once) and the steps, for a node with `gpus` GPUs (a dry run exercises every
    step, on CPU ranks where there is no GPU)."""
    size = Sizes.of(dry)
    ports = iter(range(port, port + 100))
    two = "" if (dry and gpus == 0) or gpus >= 2 else TWO_GPUS  # a dry run on a CPU: 2 CPU ranks
    quiet = ["--eval_interval", "100000", "--eval_sequences", "32", "--precision", "auto", "--overwrite", "true"]

    def train(ranks: int, name: str, *flags: str) -> list[str]:
        return [
            str(bin_dir / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(next(ports)),
            "tnf_scale/train.py",
            "--output_dir",
            str(out / name),
            *quiet,
            *flags,
        ]

    def timed(name: str, *flags: str) -> list[str]:
        return train(
            1,
            name,
            "--preset",
            size.large,
            *size.batch,
            "--max_steps",
            str(size.steps),
            "--log_interval",
            str(size.log_interval),
            "--warmup_steps",
            "2",
            *flags,
        )

    half, resume_steps = size.steps // 2, size.steps
    resume = [
        "--preset",
        "tiny",
        "--max_steps",
        str(resume_steps),
        "--save_interval",
        str(half),
        "--log_interval",
        "1",
        "--export",
        "false",
        "--seed",
        "7",
    ]
    reference, resumed = shlex.quote(str(out / "reference")), shlex.quote(str(out / "resumed"))
    copy_back = (  # the uninterrupted run without its last checkpoint, then the command after it
        f"rm -rf {resumed} && cp -r {reference} {resumed} && rm -rf {resumed}/checkpoints/step{resume_steps:08d} && "
        'exec "$@"'
    )
    jobs = [
        Job("build", "Build DeepSpeed's fused Adam", [python, "-m", "tnf_scale.ops"], 300),
        Job(
            "data",
            f"Prepare the {size.large} data",
            [python, "-m", "tnf_scale.cli.prepare", "--preset", size.large],
            300,
        ),
    ]
    steps = [
        Step(
            "Facts", [python, "-m", "tnf_scale.node_check.facts", str(out / "facts.md")], 90, shows=(out / "facts.md",)
        ),
        Step(
            "Per-task binding, simulated on gloo",
            [python, "-m", "tnf_scale.node_check.binding", str(out / "binding.md")],
            90,
            shows=(out / "binding.md",),
        ),
        Step(
            "Note store on this device",
            [python, "-m", "tnf_scale.node_check.device_notes", str(out / "device_notes.md")],
            90,
            shows=(out / "device_notes.md",),
        ),
        Step(
            "Sharded store on 2 ranks (W = 1 vs 2, bitwise, all_to_all)",
            [
                str(bin_dir / "deepspeed"),
                "--num_gpus",
                "2",
                "--master_port",
                str(next(ports)),
                "tests/workers/store_worker.py",
                str(out),
            ],
            120,
            skip=two,
        ),
        Step(
            "Host syncs per step (torch's sync debug mode)",
            [
                python,
                "-m",
                "tnf_scale.node_check.sync_census",
                str(out / "sync_census.md"),
                "--preset",
                "tiny",
                "--output_dir",
                str(out / "census"),
                *quiet,
                "--max_steps",
                "13",
                "--log_interval",
                "10",
                "--export",
                "false",
            ],
            180,
            waits_for=("build",),
            shows=(out / "sync_census.md",),
        ),
        Step(f"{size.large}, TNF off", timed("large_tnf_off", "--tnf", "off"), 300, waits_for=("build", "data")),
        Step(f"{size.large}, TNF on (with the export)", timed("large_tnf_on", "--tnf", "on"), 300),
        Step(
            f"{size.large}, TNF off, encoder layers compiled",
            timed("large_tnf_off_compiled", "--tnf", "off", "--compile", "true", "--export", "false"),
            300,
        ),
        Step(
            f"{size.large} throughput, TNF off against on, and eager against compiled",
            [
                str(bin_dir / "tnf-throughput"),
                "--run",
                str(out / "large_tnf_off"),
                str(out / "large_tnf_on"),
                str(out / "large_tnf_off_compiled"),
                "--warmup",
                str(size.warmup),
                "--out",
                str(out / "throughput"),
            ],
            120,
            shows=(out / "throughput" / "throughput.md",),
        ),
        Step(
            f"Uninterrupted to step {resume_steps}, checkpoint at {half}, dropout on",
            train(1, "reference", *resume),
            180,
        ),
        Step("A second uninterrupted run (the noise floor)", train(1, "second", *resume), 180),
        Step(
            f"Resume from step {half}",
            ["bash", "-c", copy_back, "resume", *train(1, "resumed", *resume, "--resume", "true")],
            180,
        ),
        Step(
            "Resume against the noise floor",
            [
                python,
                "-m",
                "tnf_scale.node_check.compare",
                str(out / "resume.md"),
                str(out / "reference"),
                str(out / "second"),
                str(out / "resumed"),
                str(half),
            ],
            60,
            shows=(out / "resume.md",),
        ),
        Step(
            "ZeRO-3 with activation checkpointing",
            timed(
                "zero3",
                "--deepspeed_config",
                "ds_configs/zero3.json",
                "--activation_checkpointing",
                "true",
                "--export",
                "false",
            ),
            300,
        ),
        Step("DeepSpeed's fused Adam", job="build", timeout=300),
        Step(
            "Data parallel TNF on 2 ranks, checkpointed",
            train(
                2,
                "dp2",
                "--preset",
                size.large,
                *size.batch,
                "--max_steps",
                str(half),
                "--save_interval",
                str(half),
                "--export",
                "false",
            ),
            300,
            skip=two,
        ),
        Step(
            "Its checkpoint resumed on 1 rank (the universal form)",
            train(
                1,
                "dp2",
                "--preset",
                size.large,
                *size.batch,
                "--max_steps",
                str(size.steps),
                "--resume",
                "true",
                "--export",
                "false",
            ),
            300,
            skip=two,
        ),
        Step(
            "2 pipeline stages",
            train(
                2,
                "pipeline",
                "--preset",
                "tiny",
                "--deepspeed_config",
                "ds_configs/tiny_pp2.json",
                "--max_steps",
                str(size.steps),
                "--export",
                "false",
            ),
            180,
            skip=two,
        ),
        Step(
            "Fine-tune the TNF export with its notes (TNF-F)",
            [
                str(bin_dir / "tnf-finetune"),
                "--model",
                str(out / "large_tnf_on" / "export"),
                "--task",
                "rotten_tomatoes",
                "--notes",
                "ema",
                "--seeds",
                "1",
                "--epochs",
                "1",
                "--max_train_examples",
                str(size.finetune_examples[0]),
                "--max_eval_examples",
                str(size.finetune_examples[1]),
                "--out",
                str(out / "finetune"),
            ],
            240,
            shows=(out / "finetune" / "finetune.md",),
        ),
        Step(
            f"{size.electra}, TNF on",
            train(
                1,
                "electra",
                "--preset",
                size.electra,
                *size.batch,
                "--max_steps",
                str(size.steps),
                "--log_interval",
                str(size.log_interval),
                "--export",
                "false",
            ),
            300,
        ),
    ]
    return jobs, steps
