"""Export a run as a plain Hugging Face BertForMaskedLM (no notes), and the notes on their own."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from tnf_scale.config import ConfigError
from tnf_scale.model.pipeline import hf_state_dict, is_pipeline_checkpoint

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
NOTES_FILE = "notes.safetensors"
TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # tied to word embeddings and predictions.bias
OBJECTIVE_PREFIX = "mlm."  # MaskedLMObjective holds the BertForMaskedLM as `mlm`


def consolidated_state_dict(ckpt: Path, config: BertConfig) -> dict[str, torch.Tensor]:
    """fp32 BertForMaskedLM weights of a DeepSpeed checkpoint: pipeline or not, any ZeRO stage and rank count."""
    if is_pipeline_checkpoint(ckpt):
        return hf_state_dict(ckpt, config.num_hidden_layers)
    if any(ckpt.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO disabled: rank 0's model file holds the whole module
        state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix(OBJECTIVE_PREFIX): v.float() for k, v in state.items()}


def export_hf(run_dir: Path, ckpt: Path, out_dir: Path) -> Path:
    """Write `out_dir` as a BertForMaskedLM + tokenizer that stock transformers loads."""
    if not (run_dir / MODEL_CONFIG).is_file():
        raise ConfigError(f"{run_dir} has no {MODEL_CONFIG}; point --run at a tnf_scale output directory.")
    config = BertConfig.from_json_file(str(run_dir / MODEL_CONFIG))
    model = BertForMaskedLM(config)
    state = consolidated_state_dict(ckpt, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in TIED_KEYS]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt} does not match {run_dir / MODEL_CONFIG} (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER_DIR), local_files_only=True).save_pretrained(str(out_dir))
    return out_dir


def save_notes(run_dir: Path, ids: torch.Tensor, vectors: torch.Tensor) -> Path:
    """notes.safetensors: `ids` (int64, ascending) and `vectors` (float32); words in tokenizer/rare_vocab.tsv."""
    order = torch.argsort(ids)
    path = run_dir / NOTES_FILE
    save_file({"ids": ids[order].to(torch.int64).contiguous(), "vectors": vectors[order].float().contiguous()},
              str(path), metadata={"rare_vocab": f"{TOKENIZER_DIR}/rare_vocab.tsv"})
    return path


def copy_tokenizer(tokenizer_dir: Path, run_dir: Path) -> None:
    """Keep the run's tokenizer and rare vocabulary beside its checkpoints, so export needs only the run."""
    shutil.copytree(tokenizer_dir, run_dir / TOKENIZER_DIR, dirs_exist_ok=True)
