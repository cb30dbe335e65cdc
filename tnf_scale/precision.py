"""Which precision a run computes in: `--precision auto|bf16|fp32`, kept consistent with the DeepSpeed config.

`auto` takes bf16 wherever the device computes it natively: GPUs of compute capability 8.0 and up (Ampere,
Hopper, Blackwell; `torch.cuda.is_bf16_supported()` also says yes on V100 and T4, where bf16 is emulated and slow)
and CPUs with AVX512-BF16 or AMX; anywhere else fp32. Whatever the choice, master weights, optimizer state,
gradient accumulation and reduction, notes and losses stay fp32 (ds_config.py sets the DeepSpeed side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tnf_scale.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@dataclass(frozen=True)
class Precision:
    """The run's compute precision and why it was chosen (said in the start-up line)."""

    bf16: bool
    reason: str

    @property
    def name(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def cpu_native_bf16(cpuinfo: str | None = None) -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, from its /proc/cpuinfo flags (`cpuinfo`: their text, for tests)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
    }
    found = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    return (True, f"the CPU has {' and '.join(found)}") if found else (False, "the CPU has no AVX512-BF16 or AMX")


def cuda_native_bf16(capability: tuple[int, int], name: str) -> tuple[bool, str]:
    """Whether a CUDA device of this compute capability computes bf16 natively (8.0 and up)."""
    native = capability >= (8, 0)
    kind = "native" if native else "emulated"
    return native, f"{name}, compute capability {capability[0]}.{capability[1]}: bf16 is {kind}"


def device_native_bf16(accelerator) -> tuple[bool, str]:
    """Whether DeepSpeed's accelerator computes bf16 natively on this rank's device."""
    name = accelerator.device_name()
    if name == "cpu":
        return cpu_native_bf16()
    if name == "cuda":
        return cuda_native_bf16(torch.cuda.get_device_capability(), torch.cuda.get_device_name())
    supported = accelerator.is_bf16_supported()  # other accelerators (XPU, HPU, NPU) report it themselves
    return supported, f"the {name} accelerator {'supports' if supported else 'does not support'} bf16"


def resolve_precision(flag: str, ds_bf16: object, native: tuple[bool, str], source: str) -> Precision:
    """The precision of a run from --precision, the DeepSpeed config's `bf16.enabled` (true, false or "auto") and
    whether the device computes bf16 natively; a flag that contradicts the config is one sentence."""
    if ds_bf16 is not True and ds_bf16 is not False and ds_bf16 != "auto":
        raise ConfigError(f'{source} sets bf16.enabled to {ds_bf16!r}; write true, false or "auto".')
    if flag == "fp32" and ds_bf16 is True or flag == "bf16" and ds_bf16 is False:
        raise ConfigError(
            f"--precision {flag} contradicts bf16.enabled={str(ds_bf16).lower()} in {source}; "
            'drop one of them, or set bf16.enabled to "auto".'
        )
    if flag != "auto":
        return Precision(flag == "bf16", f"--precision {flag}")
    if ds_bf16 != "auto":
        return Precision(ds_bf16, f"bf16.enabled={str(ds_bf16).lower()} in {source}")
    native, why = native
    return Precision(native, f"--precision auto: {why}")
