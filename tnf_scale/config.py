"""Typed run configuration in sections: presets, config files, command-line flags, validation with clear messages.

Everything a run needs is one `RunConfig`, made of one settings class per section (data, model, optimization,
notes, run, logging; tnf_scale/settings.py says how a field declares itself). A preset supplies defaults,
`--config FILE` (TOML, YAML or JSON, flat or nested by section) overrides the preset, and command-line flags override
both. `validate()` runs before any process group exists, so a bad value is one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tnf_scale.errors import CommandParser, ConfigError
from tnf_scale.precision import PRECISIONS
from tnf_scale.settings import (
    AUTO,
    CARRIED,
    COMPARED,
    MAY_CHANGE,
    MUST_MATCH,
    NOTES,
    PACES,
    SHAPE,
    STARTS,
    add_flags,
    choices_of,
    field_types,
    fields_of,
    markdown_table,
    names_where,
    read_config_file,
    setting,
)

REPO = Path(__file__).resolve().parent.parent  # the checkout: where launches run from, whose commit runs record
BUNDLED_CORPUS = str(REPO / "data" / "bundled_corpus.jsonl.xz")
ELECTRA_NOTES_IN = "generator"  # leak-free; discriminator reads lean on the notes (docs/electra.md)


def check_deepspeed_config_path(path: str) -> None:
    """One sentence when the DeepSpeed config file named by --deepspeed_config is not there."""
    if not Path(path).is_file():
        raise ConfigError(f"--deepspeed_config {path} does not exist; pass a JSON file such as ds_configs/zero1.json.")


def at_least(cfg: Any, names: tuple[str, ...], low: int) -> None:
    """One sentence for the first of `names` below `low` (None, where a field allows it, means "choose for me")."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name} must be {'at least 1' if low == 1 else '0 or more'}, got {value}.")


def finite(cfg: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"--{name} must be a finite number, got {getattr(cfg, name)}.")


@dataclass
class DataSettings:
    """Data: the corpus, its tokenizer, the rare band and the held-out split (what tnf-prepare takes)."""

    SECTION: typing.ClassVar[str] = "data"
    corpus: list[str] = setting(
        factory=lambda: [BUNDLED_CORPUS],
        help="text, .jsonl or .parquet files, folders, or a datasets hub name",
        resume=MAY_CHANGE,
        flag="PATH",
        init=CARRIED,
    )
    text_column: str = setting("text", help="the column of a .jsonl/.parquet corpus that holds the text",
                               resume=MAY_CHANGE, init=CARRIED)  # fmt: skip
    tokenizer: str | None = setting(
        None,
        help="a saved tokenizer directory; none trains WordPiece on the corpus",
        resume=MAY_CHANGE,
        flag="DIR",
        init=CARRIED,
    )
    tokenizer_sample_words: int = setting(
        20_000_000,
        help="WordPiece is trained on every k-th document, about this many words in all",
        resume=MAY_CHANGE,
        init=CARRIED,
    )
    vocab_size: int = setting(8192, help="WordPiece vocabulary size", init=CARRIED)
    max_seq_len: int = setting(128, help="tokens per packed sequence, [CLS] and [SEP] included")
    data_cache: str = setting(
        ".cache/tnf_data", help="where prepared data is kept (shared by every run on the same data)",
        resume=MAY_CHANGE, role=PACES, flag="DIR",
    )  # fmt: skip
    rare_min_count: int | None = setting(
        None,
        help="the rare band's lowest word count; none: the band is chosen by --rare_coverage",
        resume=MAY_CHANGE,
        init=CARRIED,
    )
    rare_max_count: int | None = setting(
        None, help="the rare band's highest word count", resume=MAY_CHANGE, init=CARRIED
    )
    rare_coverage: float = setting(
        0.02,
        help="without a band: the share of word occurrences the chosen rare band covers",
        resume=MAY_CHANGE,
        init=CARRIED,
    )
    eval_fraction: float = setting(0.02, help="share of the packed sequences held out for evaluation",
                                   resume=MAY_CHANGE, init=CARRIED)  # fmt: skip
    num_proc: int | None = setting(
        None, help="processes counting and packing words; none: every core for a large corpus (the cache is the same)",
        resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip

    def check_data(self) -> None:
        finite(self, ("rare_coverage", "eval_fraction"))
        at_least(self, ("vocab_size", "tokenizer_sample_words", "num_proc"), 1)
        if not 0.0 < self.rare_coverage < 1.0:
            raise ConfigError(f"--rare_coverage must lie strictly between 0 and 1, got {self.rare_coverage}.")
        if (self.rare_min_count is None) != (self.rare_max_count is None):
            raise ConfigError(
                "--rare_min_count and --rare_max_count go together: give both, or neither to choose the band "
                "by --rare_coverage."
            )
        if self.rare_min_count is not None and not 1 <= self.rare_min_count <= self.rare_max_count:
            raise ConfigError(
                f"the rare band needs 1 <= --rare_min_count <= --rare_max_count, got "
                f"{self.rare_min_count}..{self.rare_max_count}."
            )
        at_least(self, ("max_seq_len",), 1)
        if self.max_seq_len < 8:
            raise ConfigError(f"--max_seq_len must be at least 8 tokens, got {self.max_seq_len}.")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"--eval_fraction must lie in (0, 0.5), got {self.eval_fraction}.")
        if not self.corpus:
            raise ConfigError(
                "--corpus is empty: name at least one .txt/.jsonl/.parquet file, folder, or datasets hub name."
            )


@dataclass
class ModelSettings:
    """Model: the objective and the network's shape."""

    SECTION: typing.ClassVar[str] = "model"
    objective: Literal["mlm", "electra"] = setting(
        "mlm",
        help="mlm: BERT's masked LM; electra: ELECTRA's replaced-token detection (generator + discriminator)",
        init=SHAPE,
    )
    hidden_size: int = setting(128, help="hidden units (and embedding width)", init=SHAPE)
    num_layers: int = setting(2, help="encoder layers", init=SHAPE)
    num_heads: int = setting(2, help="attention heads; must divide --hidden_size", init=SHAPE)
    intermediate_size: int = setting(512, help="feed-forward width", init=SHAPE)
    dropout: float = setting(0.1, help="hidden and attention dropout", resume=MAY_CHANGE, init=CARRIED)
    max_position_embeddings: int = setting(
        128,
        help="the position table's size: the longest sequence the model (and its export) takes; a later phase may "
        "train at any --max_seq_len up to it",
        init=SHAPE,
    )
    generator_fraction: float = setting(
        0.25,
        help="ELECTRA: the generator's hidden size, heads and FFN width as a share of the discriminator's",
        init=SHAPE,
    )
    rtd_weight: float = setting(50.0, help="ELECTRA: loss = generator MLM + rtd_weight x discriminator loss",
                                resume=MAY_CHANGE, init=CARRIED)  # fmt: skip
    whole_word_masking: bool = setting(
        False, help="choose the tokens to predict by whole words: every piece of a chosen word is masked, a rare word "
        "whole or not at all (--mlm_probability of the tokens, as without)", resume=MAY_CHANGE, init=CARRIED,
    )  # fmt: skip
    mlm_probability: float = setting(0.15, help="share of tokens selected for prediction (BERT: 0.15)",
                                     resume=MAY_CHANGE, init=CARRIED)  # fmt: skip

    @property
    def generator_shape(self) -> tuple[int, int, int]:
        """ELECTRA's generator: (hidden size, heads, FFN width): the discriminator's x --generator_fraction."""
        fraction = self.generator_fraction
        return (
            round(self.hidden_size * fraction),
            max(1, round(self.num_heads * fraction)),
            max(1, round(self.intermediate_size * fraction)),
        )

    def check_model(self) -> None:
        finite(self, ("mlm_probability", "dropout"))
        at_least(self, ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"), 1)
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(
                f"--mlm_probability must lie strictly between 0 and 1 (BERT: 0.15), got {self.mlm_probability}."
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden_size {self.hidden_size} must be divisible by --num_heads {self.num_heads}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must lie in [0, 1), got {self.dropout}.")
        if self.objective == "electra":
            self._check_electra()

    def _check_electra(self) -> None:
        if not math.isfinite(self.rtd_weight) or self.rtd_weight <= 0:
            raise ConfigError(f"--rtd_weight must be a finite number above 0 (ELECTRA: 50), got {self.rtd_weight}.")
        if not math.isfinite(self.generator_fraction) or not 0 < self.generator_fraction <= 1:
            raise ConfigError(
                f"--generator_fraction {self.generator_fraction} would make the generator larger than the "
                f"discriminator "
                "(or empty); ELECTRA's generator is 1/4 to 1/3 of it: pass a value in (0, 1]."
            )
        hidden, heads, _ = self.generator_shape
        if hidden < 1 or hidden % heads:
            raise ConfigError(
                f"--generator_fraction {self.generator_fraction} gives the generator {hidden} hidden units for "
                f"{heads} attention "
                f"heads; choose a fraction whose share of --hidden_size {self.hidden_size} divides into its "
                f"heads (e.g. 0.25)."
            )


@dataclass
class OptimizationSettings:
    """Optimization: steps, batches, the learning-rate schedule, precision and the seed."""

    SECTION: typing.ClassVar[str] = "optimization"
    max_steps: int = setting(300, help="optimizer steps", resume=MAY_CHANGE, role=COMPARED)
    global_batch_size: int = setting(32, help="sequences per optimizer step, over every data-parallel rank")
    micro_batch_size: int | None = setting(
        None,
        help="sequences per rank per forward (gradient accumulation follows), exactly; none: the largest up to "
        "--max_micro_batch_size that divides the global batch over the data-parallel replicas",
        resume=MAY_CHANGE,
        role=PACES,
    )
    max_micro_batch_size: int = setting(
        16, help="without --micro_batch_size: the largest micro-batch the run may pick (a memory bound)",
        resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip
    lr: float = setting(1e-3, help="peak learning rate of AdamW (DeepSpeed's fused Adam)", resume=MAY_CHANGE)
    warmup_steps: int = setting(30, help="steps of linear warm-up to --lr, then --lr_schedule's decay",
                                resume=MAY_CHANGE)  # fmt: skip
    lr_schedule: Literal["linear", "cosine"] = setting(
        "linear", help="after the warm-up, the learning rate falls to --min_lr by the last step: linearly, or along "
        "half a cosine", resume=MAY_CHANGE,
    )  # fmt: skip
    min_lr: float = setting(0.0, help="the learning rate the schedule ends at (BERT: 0)", resume=MAY_CHANGE)
    weight_decay: float = setting(
        0.01, help="AdamW's decoupled weight decay; biases and LayerNorm weights are never decayed (as BERT trains)",
        resume=MAY_CHANGE,
    )  # fmt: skip
    grad_clip: float = setting(1.0, help="gradient-norm clipping (0: none)", resume=MAY_CHANGE)
    activation_checkpointing: bool = setting(
        False, help="recompute each encoder layer's activations in the backward pass (less memory, more compute)",
        resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip
    compile: bool = setting(
        False, help="compile each encoder layer with torch.compile (the note seam stays eager; compiled dropout draws "
        "other random numbers, so a compiled run does not repeat an eager one bit for bit); not with ZeRO stage 3",
        resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip
    precision: Literal[PRECISIONS] = setting(
        "auto",
        help="auto: bf16 where the device computes it natively (GPUs of compute capability 8.0+, CPUs with "
        "AVX512-BF16 or AMX), fp32 elsewhere; master weights, gradients and notes stay fp32",
        resume=MAY_CHANGE,
    )
    seed: int = setting(1234, help="data order, masks, initial weights and notes")

    def check_optimization(self) -> None:
        finite(self, ("lr", "min_lr", "weight_decay", "grad_clip"))
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"--min_lr must lie between 0 and --lr {self.lr}, got {self.min_lr}.")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"--lr must be above 0 and --weight_decay, --grad_clip at least 0, got {self.lr}, "
                f"{self.weight_decay}, {self.grad_clip}."
            )
        at_least(self, ("max_steps", "global_batch_size", "micro_batch_size", "max_micro_batch_size"), 1)
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be a whole number from 0 to 2**32 - 1 (numpy's range), got {self.seed}.")
        if self.warmup_steps < 1:
            raise ConfigError(
                f"--warmup_steps must be at least 1 (DeepSpeed's WarmupDecayLR needs a warmup step), got "
                f"{self.warmup_steps}."
            )


@dataclass
class NoteSettings:
    """Notes: TNF itself (the paper's defaults: lambda 0.5, gamma 0.1, k 16)."""

    SECTION: typing.ClassVar[str] = "notes"
    tnf: Literal["on", "off"] = setting("on", help="off runs the same pipeline without notes (the baseline)",
                                        role=COMPARED, init=CARRIED)  # fmt: skip
    note_lambda: float = setting(0.5, help="the note's share of a rare word's input embedding", resume=MAY_CHANGE,
                                 role=NOTES, init=CARRIED)  # fmt: skip
    note_gamma: float = setting(0.1, help="the note's momentum: the weight of each new context", resume=MAY_CHANGE,
                                role=NOTES, init=CARRIED)  # fmt: skip
    note_window: int = setting(16, help="k: the context a note is taken over reaches k tokens either side of the word",
                               resume=MAY_CHANGE, role=NOTES, init=CARRIED)  # fmt: skip
    notes_at_masked: bool = setting(
        False,
        help="LEAKY ABLATION: also mix notes into rare spans that hold a token the model must predict; the note then "
        "gives the masked word away and the exported model learns less",
        resume=MAY_CHANGE,
        role=NOTES,
        init=CARRIED,
    )
    notes_in: Literal["discriminator", "generator", "both"] | None = setting(
        None,
        help="ELECTRA only: which network reads notes; the discriminator always writes them. generator (ELECTRA's "
        "default: leak-free), discriminator or both (the discriminator leans on its notes, and the exported model, "
        "which has none, is worse on rare spans than the baseline: for runs whose notes stay at fine-tuning, "
        "finetune.py --notes ema|learned); none for the masked LM",
        resume=MAY_CHANGE,
        role=COMPARED,
        init=CARRIED,
    )

    @property
    def tnf_enabled(self) -> bool:
        return self.tnf == "on"

    def check_notes(self) -> None:
        for name in ("note_lambda", "note_gamma"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"--{name} must lie strictly between 0 and 1, got {value}.")
        if self.note_window < 0:
            raise ConfigError(f"--note_window (k) must be 0 or more, got {self.note_window}.")


@dataclass
class RunSettings:
    """Run and checkpoints: where the run lives, the DeepSpeed config, checkpoints, the export and the machine."""

    SECTION: typing.ClassVar[str] = "run"
    deepspeed_config: str | None = setting(
        None, help="DeepSpeed JSON; its \"auto\" values are filled from the flags (none: ZeRO-1)",
        resume=MAY_CHANGE, role=PACES, flag="FILE",
    )  # fmt: skip
    init_from: str | None = setting(
        None,
        help="start from a model instead of fresh weights: a finished run directory (phase 2: its weights, notes, "
        "tokenizer and rare words; its data and shape settings are the defaults) or a Hugging Face BERT/ELECTRA "
        "directory (its weights, tokenizer and positions; the rare words are counted on --corpus, notes start fresh)",
        role=COMPARED,
        flag="DIR",
    )
    output_dir: str = setting("runs/demo", help="the run directory", resume=MAY_CHANGE, role=STARTS, flag="DIR")
    save_interval: int = setting(0, help="steps between checkpoints (0: at the end only)", resume=MAY_CHANGE,
                                 role=PACES)  # fmt: skip
    keep_checkpoints: int = setting(
        3, help="complete checkpoints kept, the newest (0: every one); an older one is deleted only once a newer one "
        "is complete, and never the one this run resumed from", resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip
    max_nonfinite_steps: int = setting(
        5, help="consecutive steps with a non-finite loss or gradient norm before the run stops",
        resume=MAY_CHANGE, role=PACES,
    )  # fmt: skip
    resume: bool = setting(
        False, help="continue the run in --output_dir from its newest complete checkpoint (auto: when it has one, "
        "else start there as without; for a batch job that is resubmitted)", resume=MAY_CHANGE, role=STARTS, auto=True,
    )  # fmt: skip
    overwrite: bool = setting(
        False, help="start afresh in an --output_dir that holds a run, deleting it once the new run's inputs are good",
        resume=MAY_CHANGE, role=STARTS,
    )  # fmt: skip
    export: bool = setting(True, help="export a plain Hugging Face model at the end", resume=MAY_CHANGE, role=PACES)
    save_notes: bool = setting(True, help="save the note dictionary (notes.safetensors) at the end", resume=MAY_CHANGE,
                               role=PACES)  # fmt: skip
    prefetch: Literal["auto", "on", "off"] = setting(
        "auto",
        help="collate the next steps' micro-batches in a worker process while this one trains: auto (on when an "
        "accelerator computes; off on a CPU-only run, where the worker shares the step's cores), on, off",
        resume=MAY_CHANGE,
        role=PACES,
    )
    intra_op_threads: int | None = setting(
        None,
        help="CPU threads each rank's torch operations use (set on every launch path, said in each rank's start-up "
        "line); none: OMP_NUM_THREADS when set, else the node's cores shared among its ranks (never more than the "
        "cores a rank is bound to)",
        resume=MAY_CHANGE,
        role=PACES,
    )
    print_config: bool = setting(
        False,
        help="print the resolved settings and the DeepSpeed config this launch would run with, then exit 0 "
        "without starting (no directory is claimed)",
        resume=MAY_CHANGE,
        role=STARTS,
    )

    def check_run(self) -> None:
        at_least(self, ("max_nonfinite_steps", "intra_op_threads"), 1)
        at_least(self, ("save_interval", "keep_checkpoints"), 0)
        if self.deepspeed_config is not None:
            check_deepspeed_config_path(self.deepspeed_config)


@dataclass
class LoggingSettings:
    """Logging and evaluation: metric lines, held-out evaluations, phase timing."""

    SECTION: typing.ClassVar[str] = "logging"
    log_interval: int = setting(1, help="steps between metric lines", resume=MAY_CHANGE, role=PACES)
    eval_interval: int = setting(100, help="steps between held-out evaluations", resume=MAY_CHANGE, role=PACES)
    eval_sequences: int = setting(
        128, help="held-out sequences each evaluation scores (the same ones on any layout), split over the "
        "data-parallel replicas", resume=MAY_CHANGE,
    )  # fmt: skip
    profile_phases: bool = setting(
        False,
        help="synchronize the accelerator at every phase boundary of a step, so that the time_* metrics hold each "
        "phase's device time; off: the step never waits on the device for timing (on a GPU the time_* phases then "
        "show when work was queued, and the step time stays exact)",
        resume=MAY_CHANGE,
        role=PACES,
    )
    wandb_project: str | None = setting(
        None, help="log the metrics to this Weights & Biases project as well (wandb must be installed; with "
        "WANDB_MODE=offline it needs no network); a resumed run continues the same W&B run", resume=MAY_CHANGE,
        role=PACES, flag="NAME",
    )  # fmt: skip

    def check_logging(self) -> None:
        at_least(self, ("log_interval", "eval_interval", "eval_sequences"), 1)
        if self.wandb_project and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"--wandb_project {self.wandb_project} asks for Weights & Biases, which is not installed here; "
                "pip install wandb, or drop the flag (metrics.jsonl and TensorBoard log the same figures)."
            )


# Sections in the order --help, config files and the docs show them: dataclasses collect a class's fields from its
# last base to its first.
SECTIONS = (DataSettings, ModelSettings, OptimizationSettings, NoteSettings, RunSettings, LoggingSettings)


@dataclass
class RunConfig(*reversed(SECTIONS)):
    """One training run: every section's fields, as one namespace of flag names (`--field_name`)."""

    preset: str = setting("tiny", help="model shape and schedule the other settings start from", resume=MAY_CHANGE,
                          role=PACES)  # fmt: skip

    def __post_init__(self) -> None:
        if self.objective == "electra" and self.notes_in is None:
            self.notes_in = ELECTRA_NOTES_IN  # recorded in run_config.json as what the run did

    def validate(self) -> None:
        """Raise ConfigError with one clear sentence for the first bad value found."""
        for name, kind in field_types(RunConfig).items():
            choices, value = choices_of(kind), getattr(self, name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"--{name} must be one of {', '.join(choices)}, got {value!r}.")
        if self.objective != "electra" and self.notes_in is not None:
            raise ConfigError(
                f"--notes_in {self.notes_in} applies to ELECTRA (--objective electra); BERT's masked LM has one "
                "network, which reads notes: drop the flag."
            )
        for section in SECTIONS:
            getattr(section, f"check_{section.SECTION}")(self)
        if self.max_seq_len > self.max_position_embeddings:
            raise ConfigError(
                f"--max_seq_len {self.max_seq_len} exceeds the model's {self.max_position_embeddings} positions; "
                f"pass --max_position_embeddings {self.max_seq_len} or more (BERT: 512), or a shorter --max_seq_len."
            )


# What a checkpoint's tensors and data order depend on: a resume must keep them (the rest, e.g. --max_steps, may
# change); read off each field's resume rule.
RESUME_MUST_MATCH = names_where(RunConfig, "resume", MUST_MATCH)
TNF_ONLY = names_where(RunConfig, "role", NOTES)  # what notes do; not the baseline
RUN_ONLY = names_where(RunConfig, "role", STARTS)  # where and how a run is started, not what it trains
HOW_RUN = (*RUN_ONLY, *names_where(RunConfig, "role", PACES))  # how a run was started, logged and laid out
# What a baseline and a TNF run may differ in and still be compared at equal steps: TNF itself, how they were run, and
# how long (they are compared over their common steps).
COMPARISON_MAY_DIFFER = (*names_where(RunConfig, "role", COMPARED), *TNF_ONLY, *HOW_RUN)


def config_conflict(a: dict[str, Any], b: dict[str, Any], may_differ: tuple[str, ...]) -> str | None:
    """The first field outside `may_differ` in which two runs' saved configs differ, or None."""
    fields = sorted((set(a) | set(b)) - set(may_differ))
    return next((name for name in fields if a.get(name) != b.get(name)), None)


def resume_conflict(saved: dict[str, Any], cfg: RunConfig) -> str | None:
    """The first field of RESUME_MUST_MATCH whose saved value (run_config.json) differs from `cfg`'s, or None."""
    return next((name for name in RESUME_MUST_MATCH if name in saved and saved[name] != getattr(cfg, name)), None)


# The paper's setting at scale, shared by the BERT and ELECTRA presets: phase-1 sequence length, the paper's rare band
# (Wikipedia + BookCorpus), and a log, evaluation and checkpoint cadence for runs of a million steps.
AT_SCALE: dict[str, Any] = dict(
    vocab_size=30522,
    max_seq_len=128,
    max_position_embeddings=512,
    warmup_steps=10_000,
    rare_min_count=100,
    rare_max_count=500,
    log_interval=100,
    eval_interval=10_000,
    eval_sequences=2048,
    save_interval=10_000,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Sized for a 2-core CPU: the demo, the tests and the benchmarks.
    "tiny": {},
    # The tiny model for `make bench`: about 3 epochs of the bundled corpus, one run in under 20 minutes
    # here; a band of words seen 10..50 times (the paper's ratio 5), so rare words recur within a run.
    "bench": dict(
        max_steps=2400,
        warmup_steps=240,
        eval_interval=200,
        eval_sequences=544,
        rare_min_count=10,
        rare_max_count=50,
        log_interval=1,
    ),
    # BERT-base / BERT-large (Devlin et al.).
    "bert-base": dict(
        AT_SCALE,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        max_steps=1_000_000,
        global_batch_size=256,
        max_micro_batch_size=32,
        lr=1e-4,
    ),
    "bert-large": dict(
        AT_SCALE,
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        max_steps=1_000_000,
        global_batch_size=256,
        max_micro_batch_size=16,
        lr=1e-4,
    ),
    # ELECTRA (Clark et al.): the tiny CPU shape, ELECTRA-Small and ELECTRA-Base (the paper's TNF setting:
    # discriminator 768 hidden x 12 layers, generator 256 hidden). The embedding width equals the discriminator's
    # hidden size throughout, so a note (taken from the discriminator's last layer) has the width of the embedding
    # it is mixed into.
    "electra-tiny": dict(objective="electra"),
    "electra-small": dict(
        AT_SCALE,
        objective="electra",
        hidden_size=256,
        num_layers=12,
        num_heads=4,
        intermediate_size=1024,
        generator_fraction=0.25,
        max_steps=1_000_000,
        global_batch_size=128,
        max_micro_batch_size=64,
        lr=5e-4,
    ),
    "electra-base": dict(
        AT_SCALE,
        objective="electra",
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        generator_fraction=1 / 3,
        max_steps=766_000,
        global_batch_size=256,
        max_micro_batch_size=32,
        lr=2e-4,
    ),
}

CONFIG_HELP = "a TOML, YAML or JSON file of settings, flat or nested by section, applied over the preset"
PRESET_HELP = "model shape and schedule the other settings start from: " + ", ".join(PRESETS)


def build_parser(sections: tuple[type, ...] | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """Argument parser with one flag per RunConfig field (or per field of `sections`), grouped by section, all
    defaulting to the preset; --help shows each flag's default under the tiny preset and its choices."""
    parser = CommandParser(
        description=description or "TNF (Taking Notes on the Fly) BERT pre-training on DeepSpeed.",
        epilog="Defaults are the tiny preset's; --preset changes them, --config FILE overrides the preset, flags "
        "override both. docs/configuration.md has the table.",
    )
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("--preset", metavar="NAME", default=None, help=f"{PRESET_HELP} (default: tiny)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    add_flags(parser, RunConfig if sections is None else _only(sections), skip=("preset",))
    return parser


def forwarding_parser(description: str, to: str, sections: tuple[type, ...] | None = None) -> argparse.ArgumentParser:
    """A tool's parser whose --help ends with the tnf-train settings (or those of `sections`) it passes on to `to`:
    the tool's own flags are parsed, the rest of its command line is forwarded."""
    settings = build_parser(sections).format_help()
    forwarded = settings[settings.index("\n\n", settings.index("options:")) + 2 :]  # the sections, after --preset
    return CommandParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any other flag is a tnf-train setting, passed on to {to}:\n\n{forwarded}",
    )


def _only(sections: tuple[type, ...]) -> type:
    """A settings class of just `sections`' fields, for a command that takes only those."""
    return dataclass(type("Settings", tuple(reversed(sections)), {}))


def settings_table() -> str:
    """The table of every setting in docs/configuration.md (a test holds the page to it)."""
    return markdown_table(RunConfig, " (tiny)")


def resolve(preset: str, overrides: dict[str, Any]) -> RunConfig:
    """Preset values, then `overrides`; unknown presets and keys are named in the error."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    unknown = sorted(set(overrides) - set(fields_of(RunConfig)))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys are the RunConfig fields listed by --help.")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    return RunConfig(**values)


def parse_args(
    argv: list[str] | None = None, sections: tuple[type, ...] | None = None, description: str | None = None
) -> RunConfig:
    """Parse flags into a validated RunConfig (preset < --config file < flags); `sections` limits the flags to a
    command's own (the rest keep the preset's values), `description` heads its --help."""
    args = vars(build_parser(sections, description).parse_args(argv))
    config_path = args.pop("config")
    file_values = read_config_file(Path(config_path), RunConfig) if config_path else {}
    args.pop("local_rank")
    flags = {k: v for k, v in args.items() if v is not None}
    explicit = {**file_values, **flags}
    preset = explicit.pop("preset", None)
    resume_auto = explicit.get("resume") == AUTO
    if resume_auto:
        explicit.pop("resume")
    if explicit.get("init_from"):  # the model it starts from gives the shape (and phase 1 the data) defaults
        from tnf_scale.init_from import init_settings

        explicit, source_preset = init_settings(explicit)
        explicit.pop("preset", None)
        preset = preset or source_preset
    config = resolve(preset or "tiny", explicit)
    if resume_auto:
        from tnf_scale.checkpoint import latest_complete

        config = dataclasses.replace(config, resume=latest_complete(config.output_dir) is not None)
    config.validate()
    return config
