"""Typed run configuration: presets, command-line flags, validation with clear messages.

Everything a run needs is one `RunConfig`. A preset supplies defaults, `--config FILE`
(JSON) overrides the preset, and command-line flags override both. `validate()` runs
before any process group exists, so a bad value is one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tnf_scale.errors import ConfigError
from tnf_scale.precision import PRECISIONS

REPO = Path(__file__).resolve().parent.parent  # the checkout: where launches run from, whose commit runs record
BUNDLED_CORPUS = str(REPO / "data" / "bundled_corpus.jsonl.xz")


def check_deepspeed_config_path(path: str) -> None:
    """One sentence when the DeepSpeed config file named by --deepspeed_config is not there."""
    if not Path(path).is_file():
        raise ConfigError(f"--deepspeed_config {path} does not exist; pass a JSON file such as ds_configs/zero1.json.")


@dataclass
class RunConfig:
    """One training run. Field names are the command-line flags (`--field_name`)."""

    preset: str = "tiny"
    # data
    corpus: list[str] = field(default_factory=lambda: [BUNDLED_CORPUS])
    text_column: str = "text"
    tokenizer: str | None = None  # a saved tokenizer directory; None trains WordPiece on the corpus
    tokenizer_sample_words: int = (
        20_000_000  # WordPiece is trained on every k-th document, about this many words in all
    )
    data_cache: str = ".cache/tnf_data"
    rare_min_count: int | None = None  # None: choose the band by rare_coverage
    rare_max_count: int | None = None
    rare_coverage: float = 0.02
    eval_fraction: float = 0.02
    num_proc: int | None = (
        None  # processes counting and packing words; None: every core for a large corpus (the cache is the same)
    )
    # model
    objective: str = (
        "mlm"  # mlm: BERT's masked LM; electra: ELECTRA's replaced-token detection (generator + discriminator)
    )
    vocab_size: int = 8192
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_seq_len: int = 128
    dropout: float = 0.1
    generator_fraction: float = (
        0.25  # ELECTRA: the generator's hidden size, heads and FFN width as a share of the discriminator's
    )
    rtd_weight: float = 50.0  # ELECTRA: loss = generator MLM + rtd_weight x discriminator loss
    # optimisation
    max_steps: int = 300
    global_batch_size: int = 32
    micro_batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mlm_probability: float = 0.15
    activation_checkpointing: bool = False
    seed: int = 1234
    # TNF (paper defaults: lambda 0.5, gamma 0.1, k 16)
    tnf: str = "on"
    note_lambda: float = 0.5
    note_gamma: float = 0.1
    note_window: int = 16
    notes_at_masked: bool = (
        False  # leaky ablation: notes mixed into spans that hold a predicted token (docs/design.md forbids it)
    )
    notes_in: str | None = None  # ELECTRA: which network reads notes (default generator); None for the masked LM
    # run control
    deepspeed_config: str | None = None
    output_dir: str = "runs/demo"
    log_interval: int = 1
    eval_interval: int = 100
    eval_sequences: int = 128  # held-out sequences each evaluation scores, split over the data-parallel ranks
    save_interval: int = 0  # 0: save only at the end
    max_nonfinite_steps: int = 5  # consecutive steps with a non-finite loss or gradient norm before the run stops
    resume: bool = False
    overwrite: bool = False  # start afresh in an output_dir that holds a run, deleting it
    export: bool = True
    save_notes: bool = True
    profile_phases: bool = False  # synchronize the device at each phase boundary so time_* holds device time
    precision: str = "auto"  # auto: bf16 where the device computes it natively, else fp32 (precision.py)
    prefetch: str = (
        "auto"  # collate the next steps in a worker process: on, off, auto (on only when an accelerator computes)
    )
    intra_op_threads: int | None = None  # torch's CPU threads per rank; None: the node's cores shared by its ranks

    @property
    def tnf_enabled(self) -> bool:
        return self.tnf == "on"

    @property
    def generator_shape(self) -> tuple[int, int, int]:
        """ELECTRA's generator: (hidden size, heads, FFN width): the discriminator's x --generator_fraction."""
        fraction = self.generator_fraction
        return (
            round(self.hidden_size * fraction),
            max(1, round(self.num_heads * fraction)),
            max(1, round(self.intermediate_size * fraction)),
        )

    def __post_init__(self) -> None:
        if self.objective == "electra" and self.notes_in is None:
            self.notes_in = ELECTRA_NOTES_IN  # recorded in run_config.json as what the run did

    def validate(self) -> None:
        """Raise ConfigError with one clear sentence for the first bad value found."""
        if self.tnf not in ("on", "off"):
            raise ConfigError(f"--tnf must be 'on' or 'off', got {self.tnf!r}.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}.")
        if self.objective == "electra":
            self._validate_electra()
        elif self.notes_in is not None:
            raise ConfigError(
                f"--notes_in {self.notes_in} applies to ELECTRA (--objective electra); BERT's masked LM has one "
                "network, which reads notes: drop the flag."
            )
        for name in ("note_lambda", "note_gamma"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"--{name} must lie strictly between 0 and 1, got {value}.")
        if self.note_window < 0:
            raise ConfigError(f"--note_window (k) must be 0 or more, got {self.note_window}.")
        for name in ("lr", "weight_decay", "grad_clip", "mlm_probability", "rare_coverage", "eval_fraction", "dropout"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name} must be a finite number, got {getattr(self, name)}.")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"--lr must be above 0 and --weight_decay, --grad_clip at least 0, got {self.lr}, "
                f"{self.weight_decay}, {self.grad_clip}."
            )
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(
                f"--mlm_probability must lie strictly between 0 and 1 (BERT: 0.15), got {self.mlm_probability}."
            )
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
        for name in (
            "max_steps",
            "global_batch_size",
            "micro_batch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_seq_len",
            "vocab_size",
            "intermediate_size",
            "log_interval",
            "eval_interval",
            "eval_sequences",
            "max_nonfinite_steps",
            "tokenizer_sample_words",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be a whole number from 0 to 2**32 - 1 (numpy's range), got {self.seed}.")
        for name in ("num_proc", "intra_op_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.save_interval < 0:
            raise ConfigError(f"--save_interval must be 0 or more, got {self.save_interval}.")
        if self.warmup_steps < 1:
            raise ConfigError(
                f"--warmup_steps must be at least 1 (DeepSpeed's WarmupDecayLR needs a warmup step), got "
                f"{self.warmup_steps}."
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden_size {self.hidden_size} must be divisible by --num_heads {self.num_heads}.")
        if self.max_seq_len < 8:
            raise ConfigError(f"--max_seq_len must be at least 8 tokens, got {self.max_seq_len}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must lie in [0, 1), got {self.dropout}.")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"--eval_fraction must lie in (0, 0.5), got {self.eval_fraction}.")
        if not self.corpus:
            raise ConfigError(
                "--corpus is empty: name at least one .txt/.jsonl/.parquet file, folder, or datasets hub name."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        if self.prefetch not in PREFETCH:
            raise ConfigError(f"--prefetch must be one of {', '.join(PREFETCH)}, got {self.prefetch!r}.")
        if self.deepspeed_config is not None:
            check_deepspeed_config_path(self.deepspeed_config)

    def _validate_electra(self) -> None:
        if self.notes_in not in NOTES_IN:
            raise ConfigError(f"--notes_in must be one of {', '.join(NOTES_IN)}, got {self.notes_in!r}.")
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


# What a checkpoint's tensors and data order depend on: a resume must keep them (the rest, e.g. --max_steps, may
# change)
RESUME_MUST_MATCH = (
    "objective",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "generator_fraction",
    "max_seq_len",
    "tnf",
    "global_batch_size",
    "seed",
)


TNF_ONLY = ("note_lambda", "note_gamma", "note_window", "notes_at_masked")  # what notes do; not the baseline
RUN_ONLY = ("output_dir", "overwrite", "resume")  # where and how a run is started, not what it trains
# How a run was started, logged and laid out over ranks: not what it computes.
HOW_RUN = (
    *RUN_ONLY, "preset", "data_cache", "num_proc", "prefetch", "log_interval", "eval_interval", "save_interval",
    "export", "save_notes", "profile_phases", "deepspeed_config", "micro_batch_size", "activation_checkpointing",
    "max_nonfinite_steps", "intra_op_threads",
)  # fmt: skip
# What a baseline and a TNF run may differ in and still be compared at equal steps: TNF itself, how they were run, and
# how long (they are compared over their common steps).
COMPARISON_MAY_DIFFER = ("tnf", "notes_in", *TNF_ONLY, *HOW_RUN, "max_steps")


def config_conflict(a: dict[str, Any], b: dict[str, Any], may_differ: tuple[str, ...]) -> str | None:
    """The first field outside `may_differ` in which two runs' saved configs differ, or None."""
    fields = sorted((set(a) | set(b)) - set(may_differ))
    return next((name for name in fields if a.get(name) != b.get(name)), None)


def resume_conflict(saved: dict[str, Any], cfg: RunConfig) -> str | None:
    """The first field of RESUME_MUST_MATCH whose saved value (run_config.json) differs from `cfg`'s, or None."""
    return next((name for name in RESUME_MUST_MATCH if name in saved and saved[name] != getattr(cfg, name)), None)


OBJECTIVES = ("mlm", "electra")
NOTES_IN = ("discriminator", "generator", "both")
ELECTRA_NOTES_IN = "generator"  # leak-free; discriminator reads lean on the notes (docs/electra.md)
PREFETCH = ("auto", "on", "off")

# The paper's setting at scale, shared by the BERT and ELECTRA presets: phase-1 sequence length, the paper's rare band
# (Wikipedia + BookCorpus), and a log, evaluation and checkpoint cadence for runs of a million steps.
AT_SCALE: dict[str, Any] = dict(
    vocab_size=30522,
    max_seq_len=128,
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
        micro_batch_size=32,
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
        micro_batch_size=16,
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
        micro_batch_size=64,
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
        micro_batch_size=32,
        lr=2e-4,
    ),
}

_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
FLAG_HELP = {
    "objective": "mlm (BERT's masked LM, default) or electra (replaced-token detection: generator + discriminator)",
    "notes_in": "ELECTRA only: which network reads notes; the discriminator always writes them. generator (default: "
    "leak-free), discriminator or both (the discriminator leans on its notes, and the exported model, which has "
    "none, is worse on rare spans than the baseline: for runs whose notes stay at fine-tuning, finetune.py --notes "
    "ema|learned)",
    "profile_phases": "synchronize the accelerator at every phase boundary of a step, so that the time_* metrics "
    "hold each phase's device time; default false: the step never waits on the device for timing (on a GPU the "
    "time_* phases then show when work was queued, and the step time stays exact)",
    "precision": "auto (default: bf16 where the device computes it natively: GPUs of compute capability 8.0+, CPUs "
    "with AVX512-BF16 or AMX; fp32 elsewhere), bf16 or fp32; master weights, gradients and notes stay fp32",
    "prefetch": "collate the next steps' micro-batches in a worker process while this one trains: auto (default: on "
    "when an accelerator computes; off on a CPU-only run, where the worker shares the step's cores), on, off",
    "intra_op_threads": "CPU threads each rank's torch operations use (set on every launch path, said in each rank's "
    "start-up line); default: OMP_NUM_THREADS when set, else the node's cores shared among its ranks (never more "
    "than the cores a rank is bound to)",
    "notes_at_masked": "LEAKY ABLATION, default false: also mix notes into rare spans that hold a token the model must "
    "predict; the note then gives the masked word away and the exported model learns less",
}


BOOLEAN_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case)."""
    try:
        return BOOLEAN_WORDS[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a yes/no value; write true or false (or yes/no, on/off, 1/0)"
        ) from None


def _flag_type(name: str):
    kind = str(_FIELDS[name].type)
    if kind == "bool":
        return parse_bool
    if kind in ("int", "int | None"):
        return int
    if kind in ("float",):
        return float
    return str


def build_parser() -> argparse.ArgumentParser:
    """Argument parser with one flag per RunConfig field, all defaulting to the preset."""
    parser = argparse.ArgumentParser(description="TNF (Taking Notes on the Fly) BERT pre-training on DeepSpeed.")
    parser.add_argument("--config", help="JSON file of RunConfig fields, applied over the preset")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    for name, f in _FIELDS.items():
        if name == "corpus":
            parser.add_argument(
                "--corpus", nargs="+", default=None, help="text/jsonl/parquet files, folders, or a datasets hub name"
            )
        elif name == "tnf":
            parser.add_argument(
                "--tnf",
                choices=("on", "off"),
                default=None,
                help="off runs the same pipeline without notes (the baseline)",
            )
        elif str(f.type) == "bool":  # a bare --resume means --resume true
            parser.add_argument(
                f"--{name}", type=parse_bool, nargs="?", const=True, default=None, help=FLAG_HELP.get(name)
            )
        else:
            parser.add_argument(f"--{name}", type=_flag_type(name), default=None, help=FLAG_HELP.get(name))
    return parser


def resolve(preset: str, overrides: dict[str, Any]) -> RunConfig:
    """Preset values, then `overrides`; unknown presets and keys are named in the error."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys are the RunConfig fields listed by --help.")
    values = {**PRESETS[preset], **overrides, "preset": preset}
    return RunConfig(**values)


def _json_value_fits(kind: str, value: Any) -> bool:
    """Whether a JSON value has the type a RunConfig field declares (`kind` as written in the dataclass)."""
    if value is None:
        return kind.endswith("| None")
    base = kind.removesuffix(" | None")
    if base == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if base == "bool":
        return isinstance(value, bool)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse flags into a validated RunConfig (preset < --config file < flags)."""
    args = vars(build_parser().parse_args(argv))
    file_values: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist; pass a JSON file of RunConfig fields.")
        try:
            file_values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"--config {path} is not valid JSON ({err.msg} at line {err.lineno}); fix the file."
            ) from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"--config {path} must hold a JSON object of RunConfig fields.")
        for key, value in file_values.items():
            if key in _FIELDS and not _json_value_fits(str(_FIELDS[key].type), value):
                raise ConfigError(
                    f"--config {path} gives {key} = {value!r}, but {key} takes {_FIELDS[key].type}; fix the "
                    f"value in the file."
                )
    args.pop("local_rank")
    flags = {k: v for k, v in args.items() if v is not None}
    preset = flags.pop("preset", file_values.pop("preset", "tiny"))
    config = resolve(preset, {**file_values, **flags})
    config.validate()
    return config
