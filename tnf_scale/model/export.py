"""Export a run as plain Hugging Face models (no notes), and the notes on their own.

BERT runs export a `BertForMaskedLM`; ELECTRA runs export the discriminator as `ElectraForPreTraining` and the
generator beside it (`generator/`) as `ElectraForMaskedLM`, the embedding tables they shared written into both.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    ElectraForPreTraining,
)

from tnf_scale.checkpoint import CheckpointMarker, universal_form
from tnf_scale.errors import ConfigError
from tnf_scale.model.electra import SHARED_EMBEDDINGS
from tnf_scale.model.pipeline import hf_state_dict, is_pipeline_checkpoint, layer_files, universal_layers
from tnf_scale.run_dir import RARE_VOCAB_FILE, TOKENIZER_DIR, RunDir, check_out_dir

GENERATOR_DIR = "generator"  # inside an ELECTRA export: the generator


def consolidated_state_dict(ckpt: Path, config: BertConfig) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint, named as the objective module holds them (`mlm.`, `generator.`,
    `discriminator.`): pipeline or not, any ZeRO stage and rank count."""
    if runs_bf16_optimizer(ckpt):  # its fp32 masters are in a layout only DeepSpeed's universal conversion reads
        state = universal_fp32_state(ckpt)
        if is_pipeline_checkpoint(ckpt):
            return {f"mlm.{k}": v for k, v in hf_state_dict(universal_layers(state), config.num_hidden_layers).items()}
    elif is_pipeline_checkpoint(ckpt):
        return {f"mlm.{k}": v for k, v in hf_state_dict(layer_files(ckpt), config.num_hidden_layers).items()}
    elif any(ckpt.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO disabled: rank 0's model file holds the whole module; read without running pickled code
        path = ckpt / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError:
            raise ConfigError(
                f"checkpoint file {path} holds objects other than tensors and plain data; it was not loaded "
                "(a tampered or foreign file): export from a checkpoint this project wrote."
            ) from None
    return {k: v.float() for k, v in state.items()}


def runs_bf16_optimizer(ckpt: Path) -> bool:
    """Whether DeepSpeed's BF16_Optimizer wrote the checkpoint: bf16 under ZeRO-1 or on pipeline stages (its files
    are named like ZeRO's bf16 ones, which ZeRO-2 and 3 also write and DeepSpeed's zero_to_fp32 reads)."""
    return any(ckpt.glob("bf16_zero_*optim_states.pt")) and CheckpointMarker.read(ckpt).zero_stage in (0, 1)


def universal_fp32_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master weights, by name, from the checkpoint's universal form."""
    zero = universal_form(ckpt) / "zero"
    state = {}
    for folder in sorted(p for p in zero.iterdir() if (p / "fp32.pt").is_file()):
        saved = torch.load(folder / "fp32.pt", map_location="cpu", weights_only=True)
        state[folder.name] = saved["param"]
    return state


def networks_of(run: RunDir, out_dir: Path) -> list[tuple[str, torch.nn.Module, Path]]:
    """(prefix in the objective module, empty Hugging Face model, export directory) of each network a run exports."""
    if run.generator_config.is_file():
        return [
            ("discriminator.", ElectraForPreTraining(ElectraConfig.from_json_file(str(run.model_config))), out_dir),
            (
                "generator.",
                ElectraForMaskedLM(ElectraConfig.from_json_file(str(run.generator_config))),
                out_dir / GENERATOR_DIR,
            ),
        ]
    return [("mlm.", BertForMaskedLM(BertConfig.from_json_file(str(run.model_config))), out_dir)]


def network_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The weights under `prefix`; embedding tables the consolidation kept under the other ELECTRA network only
    (one tensor shared by both) are taken from there."""
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    for other in ("discriminator.", "generator."):
        for table in SHARED_EMBEDDINGS:
            key = f"electra.embeddings.{table}.weight"
            if prefix != other and key not in own and f"{other}{key}" in state:
                own[key] = state[f"{other}{key}"]
    return own


def export_hf(run_dir: Path, ckpt: Path, out_dir: Path) -> Path:
    """Write `out_dir` as Hugging Face model directories with the tokenizer, which stock transformers loads."""
    run = RunDir(run_dir)
    check_out_dir(out_dir, "the export directory")
    if not run.model_config.is_file():
        raise ConfigError(f"{run_dir} has no {run.model_config.name}; point --run at a tnf_scale output directory.")
    networks = networks_of(run, out_dir)
    state = consolidated_state_dict(ckpt, networks[0][1].config)
    broken = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ConfigError(
            f"checkpoint {ckpt} holds non-finite weights ({broken[0]} and {len(broken) - 1} more): the run had "
            f"diverged "
            "by then, so it is not exported; export an earlier checkpoint (tools/export.py --checkpoint)."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(run.tokenizer), local_files_only=True)
    for prefix, model, folder in networks:
        # tie_weights sets the tied weights from their sources: a saved copy (in a bf16 run, the bf16 model weight
        # rather than the fp32 master) must not overwrite the tensor they share
        tied = tied_keys(model)
        own = {k: v for k, v in network_state(state, prefix).items() if k not in tied}
        missing, unexpected = model.load_state_dict(own, strict=False)
        missing = [m for m in missing if m not in tied]
        if missing or unexpected:
            raise ConfigError(
                f"checkpoint {ckpt} does not match {run.model_config} (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})."
            )
        model.tie_weights()
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(folder))
        tokenizer.model_max_length = model.config.max_position_embeddings  # the longest input the model takes
        tokenizer.save_pretrained(str(folder))
    return out_dir


def tied_keys(model: torch.nn.Module) -> set[str]:
    """Weights `tie_weights` sets from others (output layers tied to the word embeddings, BERT's decoder bias)."""
    return set(getattr(model, "_tied_weights_keys", None) or {})


def save_notes(run_dir: Path, ids: torch.Tensor, vectors: torch.Tensor) -> Path:
    """notes.safetensors: `ids` (int64, ascending) and `vectors` (float32); words in tokenizer/rare_vocab.tsv."""
    order = torch.argsort(ids)
    path = RunDir(run_dir).notes
    save_file(
        {"ids": ids[order].to(torch.int64).contiguous(), "vectors": vectors[order].float().contiguous()},
        str(path),
        metadata={"rare_vocab": f"{TOKENIZER_DIR}/{RARE_VOCAB_FILE}"},
    )
    return path
