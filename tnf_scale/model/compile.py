"""--compile: every encoder layer compiled by torch.compile, in place; the note seam stays eager.

Notes are mixed in at the embeddings' LayerNorm and taken from the encoder's output (model/tnf_bert.py), both
outside every layer, so their data-dependent gathers and scatters never enter a compiled graph. Compiled dropout
draws other random numbers than eager dropout: a compiled run does not repeat an eager one bit for bit.
"""

from __future__ import annotations

from torch import nn
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.electra.modeling_electra import ElectraLayer

ENCODER_LAYERS = (BertLayer, ElectraLayer)


def compile_encoder_layers(module: nn.Module) -> int:
    """Compile each BERT or ELECTRA encoder layer inside `module` (its parameters and state-dict keys unchanged);
    returns how many were compiled."""
    layers = [m for m in module.modules() if isinstance(m, ENCODER_LAYERS)]
    for layer in layers:
        layer.compile()
    return len(layers)
