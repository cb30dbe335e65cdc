"""AdamW's parameter groups as BERT trains them: biases and LayerNorm weights are not decayed, the rest is."""

from __future__ import annotations

from typing import Any

from torch import nn


def no_decay(module: nn.Module) -> set[int]:
    """The ids of `module`'s biases and LayerNorm weights (by module type, so every path's LayerNorms count)."""
    ids = {id(p) for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    for layer in module.modules():
        if isinstance(layer, nn.LayerNorm):
            ids.update(id(p) for p in layer.parameters(recurse=False))
    return ids


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters of `module` in two groups: decayed by `weight_decay`, and not decayed; an empty
    group is left out (a pipeline stage may hold no bias)."""
    exempt = no_decay(module)
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in exempt], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in exempt], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
