"""Build DeepSpeed's JIT ops once, before any multi-rank launch (`python -m tnf_scale.ops`).

Ranks that start together and find an op unbuilt compile it in turn under one lock and
wait minutes on each other; building first into TORCH_EXTENSIONS_DIR avoids that.
"""

from __future__ import annotations

import time

from deepspeed.accelerator import get_accelerator

OPS = ("FusedAdamBuilder", "ShareMemCommBuilder")  # fused Adam; on CPU also the shared-memory collectives


def prebuild() -> list[str]:
    """Load (building when needed) every op of OPS the current accelerator has; returns their names."""
    accelerator = get_accelerator()
    built = []
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load()
            built.append(name)
    return built


if __name__ == "__main__":
    start = time.perf_counter()
    names = prebuild()
    print(
        f"DeepSpeed ops ready on {get_accelerator().device_name()}: {', '.join(names)} "
        f"({time.perf_counter() - start:.0f} s)"
    )
