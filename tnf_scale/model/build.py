"""The objective a run's --objective names: built fresh from --seed, and whether it runs on pipeline stages."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from tnf_scale.config import RunConfig
from tnf_scale.model.electra import build_electra
from tnf_scale.model.objective import MaskedLMObjective, Objective
from tnf_scale.model.tnf_bert import build_bert


def build_objective(cfg: RunConfig, tokenizer: PreTrainedTokenizerFast) -> Objective:
    """BERT's masked LM or ELECTRA's replaced-token detection, freshly initialised (the same seed, the same weights)."""
    if cfg.objective == "electra":
        return build_electra(cfg, tokenizer)
    return MaskedLMObjective(build_bert(cfg, tokenizer))


def pipeline_refusal(cfg: RunConfig) -> str | None:
    """Why this run cannot use pipeline stages, or None. ELECTRA-Base fits one GPU, so its pipeline is refused."""
    if cfg.objective == "electra":
        return (
            "--objective electra runs data parallel only (ELECTRA-Base fits one GPU): drop pipeline.stages from the "
            "DeepSpeed config (or set it to 1) and scale with more data-parallel ranks."
        )
    return None
