"""--init_from: a run that starts from a model instead of fresh weights.

Two sources. A finished run directory (phase 1 of BERT's two phases): the new run takes its exported weights (the
fp32 masters of its final checkpoint), its notes (from that checkpoint, on any number of ranks) and its tokenizer and
rare vocabulary; its data and shape settings are the new run's defaults, so the data preparation finds phase 1's
corpus entry and packs it at the new --max_seq_len. A Hugging Face BERT or ELECTRA directory (ELECTRA with its
generator in `generator/`, as this project exports it): its weights, tokenizer and position table; the rare band is
counted on the new corpus under that tokenizer and the notes start fresh. The optimizer always starts fresh
(docs/recipe.md says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, BertForMaskedLM, ElectraForMaskedLM, ElectraForPreTraining

from tnf_scale.checkpoint import (
    CheckpointMarker,
    check_note_rows,
    latest_complete,
    read_rank_files,
    sha256_of,
    union_of_ranks,
)
from tnf_scale.config import RunConfig
from tnf_scale.errors import ConfigError
from tnf_scale.model.electra import SHARED_EMBEDDINGS
from tnf_scale.model.export import GENERATOR_DIR, tied_keys
from tnf_scale.model.objective import Objective
from tnf_scale.notes.store import NoteStore
from tnf_scale.run_dir import RunDir
from tnf_scale.settings import CARRIED, SHAPE, names_where

SHAPE_SETTINGS = names_where(RunConfig, "init", SHAPE)
CARRIED_SETTINGS = names_where(RunConfig, "init", CARRIED)


@dataclass
class InitSource:
    """What a run started with --init_from takes from there."""

    path: Path
    model_dir: Path  # the Hugging Face model the weights come from (a run's export)
    settings: dict[str, Any]  # the new run's defaults: the shape, and for a run its data and note settings
    fixed: tuple[str, ...]  # of those, the ones the new run may not change
    checkpoint: Path | None = None  # a run's final checkpoint: the notes

    @property
    def run(self) -> RunDir | None:
        return RunDir(self.path) if self.checkpoint is not None else None

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"initialised from {self.path}: its weights, tokenizer and positions; notes start fresh"
        step = CheckpointMarker.read(self.checkpoint).step
        return f"phase 2 of {self.path} (finished at step {step}): its weights, notes, tokenizer and rare vocabulary"


def read_init_source(path: str) -> InitSource:
    """The source --init_from names, checked: one sentence when it is not a finished run or a model it can load."""
    folder = Path(path)
    if RunDir(folder).run_config.is_file():
        return _from_run(RunDir(folder))
    if (folder / "config.json").is_file():
        return _from_model(folder)
    raise ConfigError(
        f"--init_from {path} is neither a run directory (it has no run_config.json) nor a Hugging Face model directory "
        "(no config.json); pass a finished run's --output_dir or a directory written by save_pretrained."
    )


def _from_run(run: RunDir) -> InitSource:
    saved = run.read_run_config()
    ckpt = latest_complete(run.path)
    step = CheckpointMarker.read(ckpt).step if ckpt else 0
    if ckpt is None or step < saved["max_steps"]:
        raise ConfigError(
            f"--init_from {run.path}: that run has not finished (its newest complete checkpoint is at step {step} of "
            f"{saved['max_steps']}); finish it with --resume true first."
        )
    if not (run.export / "config.json").is_file():
        raise ConfigError(
            f"--init_from {run.path} has no export/ (it ran with --export false); write it with "
            f"tnf-export --run {run.path}, then start phase 2."
        )
    settings = {name: saved[name] for name in (*SHAPE_SETTINGS, *CARRIED_SETTINGS, "data_cache") if name in saved}
    return InitSource(run.path, run.export, {"preset": saved["preset"], **settings}, SHAPE_SETTINGS, ckpt)


def _from_model(folder: Path) -> InitSource:
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type not in ("bert", "electra"):
        raise ConfigError(
            f"--init_from {folder} holds a {config.model_type} model; TNF pre-trains BERT and ELECTRA: pass one of "
            "those."
        )
    if config.type_vocab_size != 2 or getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"--init_from {folder} has {config.type_vocab_size} token types and {config.position_embedding_type} "
            "positions; this trainer builds BERT's 2 token types and absolute positions: pass such a model."
        )
    settings: dict[str, Any] = {
        "objective": "mlm" if config.model_type == "bert" else "electra",
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "tokenizer": str(folder),
    }
    if config.model_type == "electra":
        settings["generator_fraction"] = _generator_fraction(folder, config)
    return InitSource(folder, folder, settings, (*SHAPE_SETTINGS, "tokenizer"))


def _generator_fraction(folder: Path, config) -> float:
    """ELECTRA: the --generator_fraction that builds the generator in `folder/generator` (refused if none does)."""
    generator_dir = folder / GENERATOR_DIR
    if not (generator_dir / "config.json").is_file():
        raise ConfigError(
            f"--init_from {folder} is an ELECTRA discriminator without its generator; put the generator "
            f"(ElectraForMaskedLM, save_pretrained) in {generator_dir}."
        )
    generator = AutoConfig.from_pretrained(str(generator_dir), local_files_only=True)
    if config.embedding_size != config.hidden_size or generator.embedding_size != config.hidden_size:
        raise ConfigError(
            f"--init_from {folder}: its embeddings are {config.embedding_size} wide for a {config.hidden_size}-unit "
            "discriminator; TNF mixes notes of the discriminator's width into the shared embeddings, so both must be "
            "equal (ELECTRA-Base's are)."
        )
    fraction = generator.hidden_size / config.hidden_size
    shape = RunConfig(
        objective="electra",
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        generator_fraction=fraction,
    ).generator_shape
    if shape != (generator.hidden_size, generator.num_attention_heads, generator.intermediate_size):
        raise ConfigError(
            f"--init_from {folder}: its generator ({generator.hidden_size} hidden, {generator.num_attention_heads} "
            f"heads, {generator.intermediate_size} FFN) is not the discriminator's shape scaled by one fraction; "
            "this trainer builds that shape only."
        )
    return fraction


def init_settings(explicit: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The settings a command line (or config file) `explicit` starts from under --init_from: the source's, then
    `explicit`; and the preset to resolve them on. A fixed setting given another value is refused."""
    source = read_init_source(explicit["init_from"])
    for name in source.fixed:
        if name in explicit and explicit[name] != source.settings.get(name, explicit[name]):
            raise ConfigError(
                f"--init_from {source.path} gives --{name} {source.settings[name]}; the run starts from those weights, "
                f"so --{name} {explicit[name]} cannot apply: drop the flag."
            )
    # recorded absolute in run_config.json: a report or a resume from another directory finds the same source
    return {**source.settings, **explicit, "init_from": str(source.path.resolve())}, source.settings.get("preset")


def check_same_words(source: InitSource, tokenizer_dir: Path, rare_vocab: Path) -> None:
    """A phase 2 reads and writes phase 1's notes: its prepared data must have phase 1's tokenizer and rare words."""
    run = source.run
    if run is None:
        return
    if sha256_of(rare_vocab) != sha256_of(run.rare_vocab):
        raise ConfigError(
            f"the data prepared for this run has another rare vocabulary than phase 1's ({run.rare_vocab}), so phase "
            "1's notes would belong to other words; keep phase 1's corpus, tokenizer and rare band (the defaults "
            f"under --init_from), or pass --tokenizer {run.tokenizer} to encode this corpus with phase 1's tokenizer."
        )
    if sha256_of(tokenizer_dir / "tokenizer.json") != sha256_of(run.tokenizer / "tokenizer.json"):
        raise ConfigError(
            f"the data prepared for this run has another tokenizer than phase 1's ({run.tokenizer}); pass --tokenizer "
            f"{run.tokenizer} to encode this corpus with it."
        )


def load_weights(objective: Objective, source: InitSource) -> None:
    """The source's weights into the objective's freshly built networks (before any engine wraps them)."""
    if hasattr(objective, "mlm"):
        _load(objective.mlm, BertForMaskedLM.from_pretrained(str(source.model_dir), local_files_only=True))
        return
    _load(objective.discriminator, ElectraForPreTraining.from_pretrained(str(source.model_dir), local_files_only=True))
    generator = ElectraForMaskedLM.from_pretrained(str(source.model_dir / GENERATOR_DIR), local_files_only=True)
    shared = {f"electra.embeddings.{table}.weight" for table in SHARED_EMBEDDINGS}  # the discriminator's tables
    _load(objective.generator, generator, skip=shared)


def _load(network: torch.nn.Module, loaded: torch.nn.Module, skip: set[str] = frozenset()) -> None:
    """Copy `loaded`'s weights into `network`; every weight `network` owns must be there, with its shape."""
    state = {k: v for k, v in loaded.state_dict().items() if k not in skip}
    own = set(network.state_dict()) - skip - tied_keys(network)
    missing = sorted(own - set(state))
    wrong = [k for k in own & set(state) if state[k].shape != network.state_dict()[k].shape]
    if missing or wrong:
        fault = f"{missing[0]} is missing" if missing else f"{wrong[0]} has another shape"
        raise ConfigError(
            f"the --init_from weights do not fit the network built for them ({fault}); pass a model of this "
            "architecture."
        )
    network.load_state_dict({k: state[k] for k in own}, strict=False)
    network.tie_weights()


def load_notes(store: NoteStore, source: InitSource, num_rare: int) -> bool:
    """Phase 1's notes into this rank's share of the store; False when phase 1 kept none (a --tnf off run)."""
    marker = CheckpointMarker.read(source.checkpoint) if source.checkpoint is not None else None
    if marker is None or not marker.notes:
        return False
    rank_files = read_rank_files(source.checkpoint, marker.world_size)
    check_note_rows(rank_files, num_rare, source.checkpoint)
    store.load_state_dict(union_of_ranks(rank_files))
    return True
