"""Build DeepSpeed's JIT ops once, before any multi-rank launch (`python -m tnf_scale.ops`), and say which optimizer
a run gets.

Ranks that start together and find an op unbuilt compile it in turn under one lock and
wait minutes on each other; building first into TORCH_EXTENSIONS_DIR avoids that. DeepSpeed's fused Adam on
CUDA is compiled with nvcc: on a node without a CUDA toolkit, or with one whose CUDA version DeepSpeed refuses to
build against torch's (and without a DeepSpeed built with the op), runs take torch's fused AdamW instead and say so.
"""

from __future__ import annotations

import functools
import sys
import time

import cpuinfo
import torch
from deepspeed.accelerator import get_accelerator

from tnf_scale.distributed import check_this_node
from tnf_scale.errors import exit_code

OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")  # fused Adam; on CPU also the shared-memory collectives


def ask_for_the_cpu_once() -> None:
    """Answer py-cpuinfo's question once per process. DeepSpeed's CPU op builders ask it for the -march and SIMD flags
    that key an op's build each time they load one, even a built one, and each answer runs a Python subprocess:
    about a second per call on a 2-core VM, two calls at every rank's start on a CPU."""
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def cuda_toolkit_problem() -> str | None:
    """Why DeepSpeed cannot compile a CUDA op on this node, or None. DeepSpeed's own check decides: nvcc must run, and
    its CUDA version must equal the one torch was built with, or differ only in a minor version DeepSpeed accepts (or
    DS_SKIP_CUDA_CHECK=1). Otherwise DeepSpeed raises at the op's build, in `make install` and in every run."""
    from deepspeed.ops.op_builder import builder

    if torch.version.hip:  # ROCm builds with hipcc: DeepSpeed checks no CUDA version there
        return None
    try:
        builder.assert_no_cuda_mismatch("fused_adam")
    except builder.MissingCUDAException:
        return "no CUDA toolkit (nvcc) on this node to build DeepSpeed's fused Adam"
    except builder.CUDAMismatchException:
        major, minor = builder.installed_cuda_version()
        return (
            f"nvcc is CUDA {major}.{minor} but torch was built with CUDA {torch.version.cuda}, and DeepSpeed will not "
            "build its fused Adam across them (a matching toolkit, or DS_SKIP_CUDA_CHECK=1, would let it)"
        )
    return None


def fused_adam_available(accelerator, installed: dict[str, bool], toolkit_problem) -> tuple[bool, str]:
    """Whether DeepSpeed's FusedAdam runs on `accelerator`, and why: built into the DeepSpeed install (`installed`,
    deepspeed.git_version_info.installed_ops), or buildable now; on CUDA that needs a toolkit DeepSpeed accepts
    (`toolkit_problem`: cuda_toolkit_problem, asked only there)."""
    if installed.get("fused_adam"):
        return True, "DeepSpeed's fused Adam, built into the install"
    builder = accelerator.create_op_builder("FusedAdamBuilder")
    if builder is None or not builder.is_compatible():
        return False, f"DeepSpeed's fused Adam does not build for {accelerator.device_name()}"
    problem = toolkit_problem() if accelerator.device_name() == "cuda" else None
    if problem is not None:
        return False, problem
    return True, "DeepSpeed's fused Adam"


def this_nodes_fused_adam() -> tuple[bool, str]:
    """fused_adam_available for this process's accelerator and DeepSpeed install."""
    from deepspeed.git_version_info import installed_ops

    return fused_adam_available(get_accelerator(), installed_ops, cuda_toolkit_problem)


def prebuild() -> list[str]:
    """Load (building when needed) every op of OPS the current accelerator has; returns their names."""
    accelerator = get_accelerator()
    built = []
    for name in OPS:
        if name == "FusedAdamBuilder" and not this_nodes_fused_adam()[0]:
            continue  # runs take torch's fused AdamW
        builder = accelerator.create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()
            built.append(name)
    return built


def main() -> int:
    """Refuse a GPU node whose torch cannot see its GPUs, then build the ops."""
    check_this_node()
    ask_for_the_cpu_once()
    start = time.perf_counter()
    names = prebuild()
    print(
        f"DeepSpeed ops ready on {get_accelerator().device_name()}: {', '.join(names)} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main))
