"""Facts first: versions, each GPU's name and whether the MFU table knows it, capability, NCCL, nvcc against torch's
CUDA, and the optimizer a run would take. Usage: python -m tnf_scale.node_check.facts OUT.md"""

from __future__ import annotations

import sys
from pathlib import Path

import deepspeed
import torch
import transformers
from deepspeed.accelerator import get_accelerator

from tnf_scale.model_flops import GPU_FP32_PEAK_FLOPS, GPU_PEAK_FLOPS


def nvcc_line() -> str:
    """nvcc's CUDA version against the one torch was built with, as DeepSpeed reads them."""
    from deepspeed.ops.op_builder import builder

    try:
        major, minor = builder.installed_cuda_version()
    except builder.MissingCUDAException as err:
        return f"nvcc: none ({err})"
    same = str(major) == (torch.version.cuda or "").split(".")[0]
    verdict = "equal" if same else "DIFFERS"
    return f"nvcc: CUDA {major}.{minor}; torch built with CUDA {torch.version.cuda}: major {verdict}"


def gpu_lines() -> list[str]:
    """One line per visible GPU: name, capability, memory, and the table peaks its MFU would use."""
    lines = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        name, props = torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i)
        bf16, fp32 = GPU_PEAK_FLOPS.get(name), GPU_FP32_PEAK_FLOPS.get(name)
        known = (
            f"MFU table: bf16 {bf16 / 1e12:.0f} TFLOP/s" + (f", fp32 {fp32 / 1e12:.1f}" if fp32 else ", no fp32 entry")
            if bf16
            else "NOT in the MFU table (runs log no MFU; add its datasheet peak to GPU_PEAK_FLOPS)"
        )
        lines.append(
            f"GPU {i}: {name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB; {known}"
        )
    return lines or ["GPUs: none visible to torch"]


def facts() -> list[str]:
    """Every fact line of the report's first section."""
    from tnf_scale.ops import this_nodes_fused_adam

    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none (no CUDA)"
    fused, why = this_nodes_fused_adam()
    return [
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), deepspeed {deepspeed.__version__}, "
        f"transformers {transformers.__version__}",
        f"accelerator: {get_accelerator().device_name()}; NCCL: {nccl}",
        nvcc_line(),
        *gpu_lines(),
        f"optimizer a run takes: {'DeepSpeed fused Adam' if fused else 'torch fused AdamW'} ({why})",
    ]


def main(out: Path) -> int:
    text = "".join(f"- {line}\n" for line in facts())
    out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
