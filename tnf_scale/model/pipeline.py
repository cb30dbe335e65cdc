"""BERT as DeepSpeed pipeline stages, built from the Hugging Face modules of one BertForMaskedLM.

Layers, in order (docs/design.md, "Pipeline parallelism"):
  0        EmbeddingStage  HF BertEmbeddings; the note mix at its LayerNorm input (the same seam as
                           the data-parallel path); tied with the decoder through TiedLayerSpec
  1..N     EncoderStage    HF BertLayer; the attention mask is built from the integer mask that travels,
                           once per micro-batch and stage (`StageMask`)
  N+1      HeadTransform   holds HF BertPredictionHeadTransform
  N+2      (tied)          holds the word embeddings: the decoder's weight on the last stage
  N+3      DecoderBias     holds cls.predictions.bias
Between stages travels (hidden float, attention mask int); the notes read for a micro-batch enter the first stage
with its inputs. The last three layers pass the last encoder output on unchanged: the loss function on the last stage
runs the prediction head (`PredictionHead`, their modules) on the predicted positions only, which the collator
listed, and pools the context windows for the writes. They stay three layers so that checkpoints keep their layout.
No note collective runs inside the schedule, and the last stage reads nothing back from the device per micro-batch.
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

from tnf_scale.model.objective import LossSums, loss_parts, token_cross_entropy
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


def pass_on(_, inputs):
    """The tied layer's forward on the last stage: the decoder runs in the loss function (`PredictionHead`)."""
    return inputs


class StageMask:
    """The attention mask of a stage's encoder layers, built from the integer mask of the micro-batch they run: once,
    not once per layer (building it reads whether the micro-batch holds padding back from the device)."""

    def __init__(self, config):
        self.config = config
        self.source = self.mask = None

    def __call__(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        if attention_mask is not self.source:  # the same tensor object travels through the stage's layers
            self.source = attention_mask
            self.mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
        return self.mask


class EncoderStage(nn.Module):
    def __init__(self, model: BertForMaskedLM, index: int, stage_mask: StageMask):
        super().__init__()
        self.layer = model.bert.encoder.layer[index]
        self.stage_mask = stage_mask

    def forward(self, inputs):
        hidden, attention_mask = inputs
        return self.layer(hidden, attention_mask=self.stage_mask(hidden, attention_mask)), attention_mask


class HeadTransform(nn.Module):
    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.transform = model.cls.predictions.transform

    def forward(self, inputs):
        hidden, _ = inputs
        return hidden


class DecoderBias(nn.Module):
    def __init__(self, model: BertForMaskedLM):
        super().__init__()
        self.bias = model.cls.predictions.bias

    def forward(self, hidden):
        return hidden


class PredictionHead:
    """BERT's masked-LM head on given rows of the last encoder output, run by the loss function with the last stage's
    own layers: the transform, the decoder tied to the word embeddings, the bias."""

    def __init__(self, pipeline: PipelineModule):
        (self.transform,) = (m.transform for m in pipeline.modules() if isinstance(m, HeadTransform))
        (self.bias,) = (m.bias for m in pipeline.modules() if isinstance(m, DecoderBias))
        self.tied = pipeline.tied_modules[TIED_KEY]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(rows), self.tied.embeddings.word_embeddings.weight, self.bias)


class PipelineObjective:
    """The masked-LM objective on the last stage (the loss function): summed predicted-token cross-entropy x `scale`;
    also pools notes.

    Labels travel as (predicted_index, predicted labels, predicted in a rare span, occ_sample, occ_start, occ_end,
    lengths). The step calls `start` before a batch and reads `sums()` and `pooled` after it.
    """

    def __init__(self, window: int):
        self.window = window
        self.head: PredictionHead | None = None  # set on the last stage, once the pipeline is built
        self.start(1.0, take_notes=False)

    def start(self, scale: float, take_notes: bool) -> None:
        """Begin a batch: its losses are scaled by `scale`; with `take_notes` its occurrences' notes are pooled."""
        self.scale, self.take_notes = scale, take_notes
        self.parts, self.pooled = None, []

    def sums(self) -> LossSums:
        """The batch's losses so far (zero on stages other than the last): one read back from the device."""
        return LossSums.from_parts(self.parts) if self.parts is not None else LossSums()

    def __call__(self, hidden, labels):
        predicted_index, predicted_labels, predicted_in_rare, occ_sample, occ_start, occ_end, lengths = labels
        token_ce = token_cross_entropy(self.head(hidden.flatten(0, 1)[predicted_index]), predicted_labels)
        parts = loss_parts(token_ce, predicted_in_rare)
        self.parts = parts if self.parts is None else self.parts + parts
        if self.take_notes:
            self.pooled.append(pool_windows(hidden, occ_sample, occ_start, occ_end, lengths, self.window))
        return token_ce.sum() * self.scale


def build_pipeline(
    model: BertForMaskedLM, num_stages: int, lam: float, objective: PipelineObjective, activation_checkpointing: bool
) -> PipelineModule:
    """The pipeline of `model`'s own modules (each rank keeps only its stage's layers); on the last stage `objective`
    gets the prediction head."""
    n = model.config.num_hidden_layers
    stage_mask = StageMask(model.config)
    layers = [
        TiedLayerSpec(TIED_KEY, EmbeddingStage, model, lam, tied_weight_attr="embeddings.word_embeddings.weight"),
        *(LayerSpec(EncoderStage, model, i, stage_mask) for i in range(n)),
        LayerSpec(HeadTransform, model),
        TiedLayerSpec(
            TIED_KEY,
            EmbeddingStage,
            model,
            lam,
            forward_fn=pass_on,
            tied_weight_attr="embeddings.word_embeddings.weight",
        ),
        LayerSpec(DecoderBias, model),
    ]
    pipeline = PipelineModule(
        layers=layers,
        num_stages=num_stages,
        loss_fn=objective,
        partition_method="type:EncoderStage",
        checkpointable_layers=["EncoderStage"],  # the head's layers pass their input on: nothing to recompute
        activation_checkpoint_interval=1 if activation_checkpointing else 0,
    )
    if pipeline.stage_id == num_stages - 1:
        objective.head = PredictionHead(pipeline)
    return pipeline


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
