"""A resume that DeepSpeed's CPU Adam continues exactly.

DeepSpeed's fused Adam on the CPU (its C++ `IncrementStep`) keeps beta1^t and beta2^t as running float products in
process state: each step multiplies them by beta. No checkpoint holds that state, and a resumed process computes
std::pow(beta, t) on its first step instead; in float the two differ by an ulp at some steps (beta2 = 0.999: t = 3,
6, 9, 19, ...), and the bias correction then moves about half the weights by an ulp. Replaying the steps on a
one-element tensor brings the state to where the uninterrupted process had it. GPUs need nothing: the CUDA kernel
takes pow(beta, t) on every call.
"""

from __future__ import annotations

import torch
from deepspeed.ops.adam import FusedAdam


def inner_optimizer(optimizer):
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16_Optimizer), or `optimizer` itself."""
    return getattr(optimizer, "optimizer", optimizer)


def replay_cpu_adam_steps(optimizer, device: torch.device) -> int:
    """On the CPU, advance DeepSpeed's fused Adam state through the steps a loaded optimizer has taken; returns how
    many were replayed (0 elsewhere, or before the first step)."""
    adam = inner_optimizer(optimizer)
    if device.type != "cpu" or not isinstance(adam, FusedAdam):
        return 0
    steps = max((int(s["step"]) for s in adam.state.values() if "step" in s), default=0)
    group = adam.param_groups[0]
    beta1, beta2 = group["betas"]
    param, grad, exp_avg, exp_avg_sq = (torch.zeros(1) for _ in range(4))
    for step in range(1, steps + 1):  # what each step of the uninterrupted process did to the state
        adam.multi_tensor_adam(
            2048, adam._dummy_overflow_buf, [[grad], [param], [exp_avg], [exp_avg_sq]], group["lr"], beta1, beta2,
            group["eps"], step, adam.adam_w_mode, 1 if group["bias_correction"] else 0, group["weight_decay"],
        )  # fmt: skip
    return steps
