"""Model FLOPs of a run and the dense peaks of the GPUs its MFU is measured against, in the math it computes in.

Model FLOPs per trained token (forward x 3 for forward + backward), for L layers, hidden h,
feed-forward f, sequence s, vocabulary V, and the MLM head run on a fraction p of tokens:
  per layer  8 h^2 (Q, K, V, output projections) + 4 h f (feed-forward) + 4 s h (scores, weighted sum)
  head       p (2 h^2 + 2 h V)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tnf_scale.run_dir import RunDir

# Dense (no sparsity) bf16 tensor-core peaks per GPU (FLOP/s), from NVIDIA's datasheets, by the exact name NVML and
# torch report. A name that is not here gets no MFU (the report says so), never a near miss: "L40S" is not "L4", an
# H100 PCIe is not an H100 SXM. GPUs without native bf16 (V100, T4) have no entry: auto trains them in fp32.
GPU_PEAK_FLOPS = {
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A40": 149.7e12,
    "NVIDIA L4": 121e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA B200": 2250e12,
}
# The dense TF32 tensor-core peak of every GPU above is half its bf16 one (NVIDIA's datasheets).
TF32_SHARE = 0.5
# Dense fp32 peaks without tensor cores: an fp32 run's matmuls with TF32 off, torch's default for matmuls.
GPU_FP32_PEAK_FLOPS = {
    "NVIDIA A100-SXM4-40GB": 19.5e12,
    "NVIDIA A100-SXM4-80GB": 19.5e12,
    "NVIDIA A100-PCIE-40GB": 19.5e12,
    "NVIDIA A100 80GB PCIe": 19.5e12,
    "NVIDIA A10": 31.2e12,
    "NVIDIA A40": 37.4e12,
    "NVIDIA L4": 30.3e12,
    "NVIDIA L40": 90.5e12,
    "NVIDIA L40S": 91.6e12,
    "NVIDIA H100 80GB HBM3": 67e12,
    "NVIDIA H100 PCIe": 51e12,
    "NVIDIA H100 NVL": 60e12,
    "NVIDIA H200": 67e12,
    "NVIDIA H200 NVL": 60e12,
    "NVIDIA GH200 480GB": 67e12,
}


def encoder_flops(layers: int, hidden: int, ffn: int, seq_len: int) -> float:
    """Forward FLOPs per token of a transformer encoder: projections, FFN and attention scores."""
    return layers * (8 * hidden**2 + 4 * hidden * ffn + 4 * seq_len * hidden)


def flops_per_token(layers: int, hidden: int, ffn: int, seq_len: int, vocab: int, head_fraction: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of BERT with an MLM head."""
    head = head_fraction * (2 * hidden**2 + 2 * hidden * vocab)
    return 3 * (encoder_flops(layers, hidden, ffn, seq_len) + head)


def electra_flops_per_token(generator: dict, discriminator: dict, seq_len: int, mlm_fraction: float) -> float:
    """Training FLOPs per token of ELECTRA: both encoders, the generator's embedding projection, its MLM head at the
    masked positions and the discriminator's head at every position (Hugging Face config fields)."""
    small, width, vocab = generator["hidden_size"], generator["embedding_size"], generator["vocab_size"]
    big = discriminator["hidden_size"]
    forward = (
        encoder_flops(generator["num_hidden_layers"], small, generator["intermediate_size"], seq_len)
        + encoder_flops(discriminator["num_hidden_layers"], big, discriminator["intermediate_size"], seq_len)
        + (2 * width * small if width != small else 0)
        + mlm_fraction * (2 * small * width + 2 * width * vocab)
        + 2 * big**2
        + 2 * big
    )
    return 3 * forward


def run_flops_per_token(run: Path, max_seq_len: int, mlm_probability: float) -> float:
    """Model FLOPs per token of a run, from its model config(s); heads counted where the objective needs them."""
    model = RunDir(run).read_model_config()
    if RunDir(run).generator_config.is_file():
        generator = json.loads(RunDir(run).generator_config.read_text())
        return electra_flops_per_token(generator, model, max_seq_len, mlm_probability)
    return flops_per_token(
        model["num_hidden_layers"],
        model["hidden_size"],
        model["intermediate_size"],
        max_seq_len,
        model["vocab_size"],
        mlm_probability,
    )


def compute_math(precision: str, device_type: str) -> str:
    """The math a run's matmuls compute in: its precision (bf16, fp32), or tf32 for an fp32 run on CUDA whose torch
    lets matmuls use TF32 (set_float32_matmul_precision "high" or "medium", or matmul.allow_tf32 = True)."""
    if precision == "fp32" and device_type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def gpu_peak(name: str, math: str = "bf16") -> float | None:
    """The dense peak of one GPU of this exact name in `math` (compute_math), or None."""
    if math == "fp32":
        return GPU_FP32_PEAK_FLOPS.get(name)
    peak = GPU_PEAK_FLOPS.get(name)
    return peak * TF32_SHARE if peak and math == "tf32" else peak


@dataclass(frozen=True)
class ModelRate:
    """A run's model FLOPs per trained token and the peak its MFU is against (None: no table peak for its device,
    e.g. a CPU, whose peak the throughput report measures instead)."""

    flops_per_token: float
    peak_flops_per_s: float | None

    @classmethod
    def of_run(
        cls, run: Path, max_seq_len: int, mlm_probability: float, device: str, ranks: int, math: str = "bf16"
    ) -> ModelRate:
        """From the run's written model config(s); `device` as distributed.device_name names it, on `ranks` ranks
        computing in `math` (compute_math)."""
        peak = gpu_peak(device, math)
        return cls(run_flops_per_token(run, max_seq_len, mlm_probability), peak * ranks if peak else None)

    def figures(self, tokens_per_s: float) -> dict[str, float]:
        """The model FLOP/s of a step at `tokens_per_s` (all ranks'), and its MFU when the peak is known."""
        achieved = self.flops_per_token * tokens_per_s
        return {
            "model_flops_per_s": achieved,
            **({"mfu": achieved / self.peak_flops_per_s} if self.peak_flops_per_s else {}),
        }
