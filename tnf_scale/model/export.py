"""Export a run as a plain Hugging Face BertForMaskedLM (no notes), and the notes on their own."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from tnf_scale.config import ConfigError
from tnf_scale.model.pipeline import hf_state_dict, is_pipeline_checkpoint
from tnf_scale.run_dir import RARE_VOCAB_FILE, TOKENIZER_DIR, RunDir

TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")  # tied to word embeddings and predictions.bias
OBJECTIVE_PREFIX = "mlm."  # MaskedLMObjective holds the BertForMaskedLM as `mlm`


def consolidated_state_dict(ckpt: Path, config: BertConfig) -> dict[str, torch.Tensor]:
    """fp32 BertForMaskedLM weights of a DeepSpeed checkpoint: pipeline or not, any ZeRO stage and rank count."""
    if is_pipeline_checkpoint(ckpt):
        return hf_state_dict(ckpt, config.num_hidden_layers)
    if any(ckpt.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO disabled: rank 0's model file holds the whole module; read without running pickled code
        path = ckpt / "mp_rank_00_model_states.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError:
            raise ConfigError(f"checkpoint file {path} holds objects other than tensors and plain data; it was not loaded "
                              "(a tampered or foreign file): export from a checkpoint this project wrote.") from None
    return {k.removeprefix(OBJECTIVE_PREFIX): v.float() for k, v in state.items()}


def export_hf(run_dir: Path, ckpt: Path, out_dir: Path) -> Path:
    """Write `out_dir` as a BertForMaskedLM + tokenizer that stock transformers loads."""
    run = RunDir(run_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"the export directory {out_dir} is a file; name a directory (or move the file away).")
    if not run.model_config.is_file():
        raise ConfigError(f"{run_dir} has no {run.model_config.name}; point --run at a tnf_scale output directory.")
    config = BertConfig.from_json_file(str(run.model_config))
    model = BertForMaskedLM(config)
    state = consolidated_state_dict(ckpt, config)
    broken = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ConfigError(f"checkpoint {ckpt} holds non-finite weights ({broken[0]} and {len(broken) - 1} more): the run had diverged "
                          "by then, so it is not exported; export an earlier checkpoint (tools/export.py --checkpoint).")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in TIED_KEYS]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt} does not match {run.model_config} (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(run.tokenizer), local_files_only=True).save_pretrained(str(out_dir))
    return out_dir


def save_notes(run_dir: Path, ids: torch.Tensor, vectors: torch.Tensor) -> Path:
    """notes.safetensors: `ids` (int64, ascending) and `vectors` (float32); words in tokenizer/rare_vocab.tsv."""
    order = torch.argsort(ids)
    path = RunDir(run_dir).notes
    save_file({"ids": ids[order].to(torch.int64).contiguous(), "vectors": vectors[order].float().contiguous()},
              str(path), metadata={"rare_vocab": f"{TOKENIZER_DIR}/{RARE_VOCAB_FILE}"})
    return path
