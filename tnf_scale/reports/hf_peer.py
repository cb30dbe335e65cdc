"""The throughput peer: the same BERT, data, global batch and optimizer, trained by the Hugging Face Trainer.

    deepspeed --num_gpus 1 tnf_scale/reports/hf_peer.py --preset bench --max_steps 200 \
        --output_dir runs/bench/hf_trainer

The Trainer runs through its DeepSpeed integration with the DeepSpeed config train.py builds for
the same flags (AdamW, WarmupDecayLR, clipping, ZeRO stage, bf16 by accelerator). Samples arrive
in train.py's order with train.py's masks. The model is stock `BertForMaskedLM`, so its MLM head
runs on every position (train.py runs it on the masked ones only), and it takes no notes: the peer
is the baseline's counterpart. It writes run_config.json, model_config.json and metrics.jsonl
(tokens/s per step) like train.py, so tools/throughput_report.py reads it like any run.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch
from deepspeed.accelerator import get_accelerator
from torch.utils.data import Dataset, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from tnf_scale.anatomy import EngineClock, install_engine_clock
from tnf_scale.config import RunConfig
from tnf_scale.data.collate import Collator
from tnf_scale.data.sampler import GlobalBatchSampler
from tnf_scale.errors import ConfigError
from tnf_scale.metrics import MetricsLogger
from tnf_scale.model.tnf_bert import build_bert
from tnf_scale.startup import command, start


class OrderPositions(Dataset):
    """Positions 0..n-1 of train.py's sample stream; `StreamCollator` turns them into samples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, position: int) -> dict[str, int]:
        return {"position": position}


class StreamCollator:
    """The masked, padded micro-batch train.py would build for the same order positions."""

    def __init__(self, train_set, sampler: GlobalBatchSampler, collator: Collator):
        self.train_set, self.sampler, self.collator = train_set, sampler, collator

    def __call__(self, features: list[dict[str, int]]) -> dict[str, torch.Tensor]:
        batch = self.collator(self.train_set, *self.sampler.at([f["position"] for f in features]))
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


class InOrderTrainer(Trainer):
    """The stock Trainer, reading positions in order: the shuffling is train.py's, inside the positions."""

    # BertForMaskedLM's loss is each micro-batch's mean, not pre-divided for accumulation; without this the
    # Trainer (which under DeepSpeed turns off DeepSpeed's own division) would sum the micro-batch means.
    loss_is_scaled_for_ga = False

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class StepMetrics(TrainerCallback):
    """One metrics.jsonl record per optimizer step, with the fields train.py writes for throughput.

    A step's time runs from the previous step's end to its own, so it holds data loading too; its engine phases
    (`time_forward` ...) come from the engine clock, reset where the step begins.
    """

    def __init__(self, metrics: MetricsLogger, sampler: GlobalBatchSampler, lengths: list[int], clock: EngineClock):
        self.metrics, self.sampler, self.lengths, self.clock = metrics, sampler, lengths, clock
        self.start = self.last = 0.0
        self.tokens = 0
        self.pending: dict | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.take()

    def on_step_end(self, args, state, control, **kwargs):
        """Time the step; the last step is always logged, as train.py logs it, even off the logging schedule."""
        if state.global_step >= state.max_steps:
            control.should_log = True
        now = time.perf_counter()
        indices, _, _ = self.sampler.step(state.global_step - 1)
        tokens = sum(self.lengths[i] for i in indices)
        self.tokens += tokens
        self.pending = {
            "step": state.global_step,
            "tokens": self.tokens,
            "wall_time": now - self.start,
            "step_seconds": now - self.last,
            "tokens_per_s": tokens / (now - self.last),
            **{f"time_{phase}": seconds for phase, seconds in self.clock.take().items()},
        }
        self.last = now
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending is not None and logs and "loss" in logs:
            self.metrics.log({**self.pending, "loss": logs["loss"], "lr": logs.get("learning_rate", 0.0)})
            self.pending = None


PEER_TRAINS = {"init_from": None, "whole_word_masking": False}  # a fresh model, per-token masking


def run(cfg: RunConfig) -> int:
    cfg = dataclasses.replace(cfg, tnf="off")
    for name, value in PEER_TRAINS.items():
        if getattr(cfg, name) != value:
            raise ConfigError(
                f"--{name} {getattr(cfg, name)}: the Hugging Face Trainer peer measures the fresh, per-token-masked "
                f"baseline only; drop the flag."
            )
    started = start(
        cfg,
        pipeline_refusal="the Hugging Face Trainer has no pipeline parallelism; "
        "give the peer a DeepSpeed config without pipeline.stages.",
    )
    world, ds_config, run_dir, data, log = started.topo, started.ds_config, started.run, started.data, started.log
    model = build_bert(cfg, data.tokenizer)
    if world.is_main:
        run_dir.write_run_files(cfg, model.config, data.tokenizer_dir, world.size, started.run_details())

    sampler = GlobalBatchSampler(len(data.train), cfg.global_batch_size, cfg.seed)
    optimizer = ds_config["optimizer"]["params"]
    args = TrainingArguments(
        output_dir=str(run_dir.hf_trainer),
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=optimizer["betas"][0],
        adam_beta2=optimizer["betas"][1],
        adam_epsilon=optimizer["eps"],
        max_grad_norm=cfg.grad_clip,
        lr_scheduler_type="linear",
        warmup_steps=cfg.warmup_steps,
        bf16=ds_config["bf16"]["enabled"],
        use_cpu=world.device.type == "cpu",  # the Trainer asks before it computes in bf16 on a CPU
        deepspeed=ds_config,
        logging_steps=cfg.log_interval,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_drop_last=True,
        disable_tqdm=not world.is_main,
    )
    metrics = MetricsLogger(run_dir.path, world.is_main)
    clock = install_engine_clock(get_accelerator().synchronize if cfg.profile_phases else None)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    trainer = InOrderTrainer(
        model=model,
        args=args,
        train_dataset=OrderPositions(cfg.max_steps * cfg.global_batch_size),
        data_collator=StreamCollator(
            data.train, sampler, Collator(data.tokenizer, cfg.max_seq_len, cfg.mlm_probability, cfg.seed)
        ),
        callbacks=[StepMetrics(metrics, sampler, lengths, clock)],
    )
    log(
        f"Hugging Face Trainer peer: world {world.size} on {get_accelerator().device_name()}, DeepSpeed "
        f"{trainer.is_deepspeed_enabled}"
    )
    trainer.train()
    metrics.close()
    log(f"run: {run_dir.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
