"""Throughput figures of a run: tokens/s, the step split into phases, model FLOPs, MFU, GPU state.

Model FLOPs per trained token (forward x 3 for forward + backward), for L layers, hidden h,
feed-forward f, sequence s, vocabulary V, and the MLM head run on a fraction p of tokens:
  per layer  8 h^2 (Q, K, V, output projections) + 4 h f (feed-forward) + 4 s h (scores, weighted sum)
  head       p (2 h^2 + 2 h V)
"""
from __future__ import annotations

import statistics
import time

import torch

PHASES = ("data", "note_read", "forward", "backward", "optimizer", "note_write")
# Dense bf16/fp16 tensor-core peaks (FLOP/s) by the NVML device name's model; MFU is left out for others.
GPU_PEAK_FLOPS = {"H100": 989e12, "A100": 312e12, "L4": 121e12, "V100": 125e12}


def flops_per_token(layers: int, hidden: int, ffn: int, seq_len: int, vocab: int, head_fraction: float) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of BERT with an MLM head."""
    per_layer = 8 * hidden**2 + 4 * hidden * ffn + 4 * seq_len * hidden
    head = head_fraction * (2 * hidden**2 + 2 * hidden * vocab)
    return 3 * (layers * per_layer + head)


def measured_matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """This machine's best fp32 matmul rate (FLOP/s), measured now: the CPU's reference for MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def gpu_state() -> dict:
    """Name, memory and utilisation of each GPU through NVML, or a note that there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as err:  # no driver, no library: there is no GPU to report
        return {"gpus": [], "note": f"no GPU: NVML is not available ({type(err).__name__})"}
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        memory, util = pynvml.nvmlDeviceGetMemoryInfo(handle), pynvml.nvmlDeviceGetUtilizationRates(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        gpus.append({"name": name if isinstance(name, str) else name.decode(), "memory_used_gb": memory.used / 1e9,
                     "memory_total_gb": memory.total / 1e9, "utilization_pct": util.gpu})
    pynvml.nvmlShutdown()
    return {"gpus": gpus, "note": f"{len(gpus)} GPU(s) seen by NVML"}


def gpu_peak(name: str) -> float | None:
    return next((peak for model, peak in GPU_PEAK_FLOPS.items() if model in name), None)


def summarize(steps: list[dict], samples_per_step: int) -> dict:
    """Median and spread (min, max) of tokens/s and samples/s, and the median seconds of each phase."""
    tokens_per_s = [r["tokens_per_s"] for r in steps]
    samples_per_s = [samples_per_step / r["step_seconds"] for r in steps]
    return {
        "steps": len(steps),
        "tokens_per_s": {"median": statistics.median(tokens_per_s), "min": min(tokens_per_s), "max": max(tokens_per_s)},
        "samples_per_s": {"median": statistics.median(samples_per_s), "min": min(samples_per_s), "max": max(samples_per_s)},
        "step_seconds": statistics.median(r["step_seconds"] for r in steps),
        "phase_seconds": {p: statistics.median(r.get(f"time_{p}", 0.0) for r in steps) for p in PHASES},
    }
