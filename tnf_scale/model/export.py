"""Export a run as a plain Hugging Face BertForMaskedLM (no notes), and the notes on their own."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from tnf_scale.config import ConfigError

MODEL_CONFIG = "model_config.json"
TOKENIZER_DIR = "tokenizer"
NOTES_FILE = "notes.safetensors"
OBJECTIVE_PREFIX = "mlm."  # MaskedLMObjective holds the BertForMaskedLM as `mlm`


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed checkpoint directory, whatever its ZeRO stage and rank count."""
    if any(ckpt.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # ZeRO disabled: rank 0's model file holds the whole module.
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_hf(run_dir: Path, ckpt: Path, out_dir: Path) -> Path:
    """Write `out_dir` as a BertForMaskedLM + tokenizer that stock transformers loads."""
    if not (run_dir / MODEL_CONFIG).is_file():
        raise ConfigError(f"{run_dir} has no {MODEL_CONFIG}; point --run at a tnf_scale output directory.")
    model = BertForMaskedLM(BertConfig.from_json_file(str(run_dir / MODEL_CONFIG)))
    state = {k.removeprefix(OBJECTIVE_PREFIX): v for k, v in consolidated_state_dict(ckpt).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "cls.predictions.decoder.weight"]  # tied to the word embeddings
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
