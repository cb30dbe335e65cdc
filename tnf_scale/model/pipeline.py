"""BERT as DeepSpeed pipeline stages, built from the Hugging Face modules of one BertForMaskedLM.

Layers, in order (TNF_SPEC section 6):
  0        EmbeddingStage  HF BertEmbeddings; the note mix at its LayerNorm input (the same seam as
                           the data-parallel path); tied with the decoder through TiedLayerSpec
  1..N     EncoderStage    HF BertLayer, attention mask rebuilt from the integer mask that travels
  N+1      HeadTransform   HF BertPredictionHeadTransform; passes the last encoder output on for notes
  N+2      (tied)          decoder: transformed @ word_embeddings^T
  N+3      DecoderBias     cls.predictions.bias
Between stages travels (hidden float, attention mask int); the notes read for a micro-batch
enter the first stage with its inputs, and the loss function on the last stage pools the
context windows for the writes. No note collective runs inside the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from transformers import BertForMaskedLM
from transformers.masking_utils import create_bidirectional_mask

from tnf_scale.data.batch import IGNORE_INDEX
from tnf_scale.model.objective import LossSums, token_cross_entropy
from tnf_scale.model.tnf_bert import NoteMixer
from tnf_scale.notes.note_math import pool_windows

TIED_KEY = "word_embeddings"


class EmbeddingStage(nn.Module):
    def __init__(self, model: BertForMaskedLM, lam: float):
        super().__init__()
        self.embeddings = model.bert.embeddings
        self.mixer = NoteMixer(self.embeddings.LayerNorm, lam)

    def forward(self, inputs):
        input_ids, attention_mask, token_index, token_occ, rows = inputs
        self.mixer.set_reads(token_index, token_occ, rows)
        try:
            hidden = self.embeddings(input_ids=input_ids)
        finally:
            self.mixer.clear()
        return hidden, attention_mask


def decode(stage: EmbeddingStage, inputs):
    """The tied decoder on the last stage: logits without bias from the shared word embeddings."""
    transformed, hidden = inputs
    return F.linear(transformed, stage.embeddings.word_embeddings.weight), hidden


class EncoderStage(nn.Module):
    def __init__(self, model: BertForMaskedLM, index: int):
        super().__init__()
        self.config = model.config
        self.layer = model.bert.encoder.layer[index]

    def forward(self, inputs):
        hidden, attention_mask = inputs
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        return self.layer(hidden, attention_mask=mask), attention_mask


class HeadTransform(nn.Module):
    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.transform = model.cls.predictions.transform

    def forward(self, inputs):
        hidden, _ = inputs
        return self.transform(hidden), hidden


class DecoderBias(nn.Module):
    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.bias = model.cls.predictions.bias

    def forward(self, inputs):
        logits, hidden = inputs
        return logits + self.bias, hidden


class PipelineObjective:
    """The masked-LM objective on the last stage (the loss function): summed predicted-token cross-entropy x `scale`;
    also pools notes.

    Labels travel as (labels, occ_sample, occ_start, occ_end, lengths, in_rare_span). The step calls `start` before a
    batch and reads `sums` (LossSums) and `pooled` after it.
    """

    def __init__(self, window: int):
        self.window = window
        self.start(1.0, take_notes=False)

    def start(self, scale: float, take_notes: bool) -> None:
        """Begin a batch: its losses are scaled by `scale`; with `take_notes` its occurrences' notes are pooled."""
        self.scale, self.take_notes = scale, take_notes
        self.sums, self.pooled = LossSums(), []

    def __call__(self, outputs, labels):
        logits, hidden = outputs
        labels, occ_sample, occ_start, occ_end, lengths, in_rare_span = labels
        predicted = labels != IGNORE_INDEX
        token_ce = token_cross_entropy(logits[predicted], labels[predicted])
        self.sums.add(token_ce, in_rare_span[predicted])
        if self.take_notes:
            self.pooled.append(pool_windows(hidden, occ_sample, occ_start, occ_end, lengths, self.window))
        return token_ce.sum() * self.scale


def build_pipeline(
    model: BertForMaskedLM, num_stages: int, lam: float, objective: PipelineObjective, activation_checkpointing: bool
) -> PipelineModule:
    """The pipeline of `model`'s own modules (each rank keeps only its stage's layers)."""
    n = model.config.num_hidden_layers
    layers = [
        TiedLayerSpec(TIED_KEY, EmbeddingStage, model, lam, tied_weight_attr="embeddings.word_embeddings.weight"),
        *(LayerSpec(EncoderStage, model, i) for i in range(n)),
        LayerSpec(HeadTransform, model),
        TiedLayerSpec(
            TIED_KEY,
            EmbeddingStage,
            model,
            lam,
            forward_fn=decode,
            tied_weight_attr="embeddings.word_embeddings.weight",
        ),
        LayerSpec(DecoderBias, model),
    ]
    return PipelineModule(
        layers=layers,
        num_stages=num_stages,
        loss_fn=objective,
        partition_method="type:EncoderStage",
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
    )


def layer_files(ckpt: Path) -> Callable[[int], dict[str, torch.Tensor]]:
    """Stage layer `index`'s weights as a pipeline checkpoint's per-layer files hold them (the model's dtype)."""

    def load(index: int) -> dict[str, torch.Tensor]:
        files = sorted(ckpt.glob(f"layer_{index:02d}-*model_states.pt"))
        return torch.load(files[0], map_location="cpu", weights_only=True)

    return load


def universal_layers(state: dict[str, torch.Tensor]) -> Callable[[int], dict[str, torch.Tensor]]:
    """Stage layer `index`'s weights from a universal checkpoint's parameters, named `INDEX.KEY` (the tied
    embedding stage `tied_modules.word_embeddings.KEY`)."""

    def load(index: int) -> dict[str, torch.Tensor]:
        prefix = f"tied_modules.{TIED_KEY}." if index == 0 else f"{index}."
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    return load


def hf_state_dict(load: Callable[[int], dict[str, torch.Tensor]], num_layers: int) -> dict[str, torch.Tensor]:
    """A BertForMaskedLM state dict (fp32) from the weights of each stage layer, `load(index)`."""
    state = {f"bert.{k}": v for k, v in load(0).items()}
    for i in range(num_layers):
        state.update({f"bert.encoder.layer.{i}.{k.removeprefix('layer.')}": v for k, v in load(i + 1).items()})
    state.update({f"cls.predictions.{k}": v for k, v in load(num_layers + 1).items()})
    state.update({f"cls.predictions.{k}": v for k, v in load(num_layers + 3).items()})
    return {k: v.float() for k, v in state.items()}


def is_pipeline_checkpoint(ckpt: Path) -> bool:
    return any(ckpt.glob("layer_00-*model_states.pt"))
