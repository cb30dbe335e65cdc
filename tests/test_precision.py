"""The precision rule: bf16 where the device computes it natively, kept consistent with the DeepSpeed config, and
DeepSpeed set up for fp32 gradient accumulation and reduction whenever it computes in bf16."""

from __future__ import annotations

import json

import pytest

from tnf_scale.config import RunConfig, parse_args
from tnf_scale.ds_config import build_ds_config
from tnf_scale.errors import ConfigError
from tnf_scale.precision import cpu_native_bf16, cuda_native_bf16, resolve_precision

NATIVE, EMULATED = (True, "native"), (False, "emulated")


def cpuinfo(*flags: str) -> str:
    return "".join(f"processor\t: {i}\nflags\t\t: fpu sse2 avx2 avx512f {' '.join(flags)}\n\n" for i in range(2))


@pytest.mark.parametrize(
    "flags, native", [(("avx512_bf16",), True), (("amx_bf16", "amx_tile"), True), (("avx512vl",), False), ((), False)]
)
def test_a_cpu_computes_bf16_natively_with_avx512_bf16_or_amx(flags, native):
    found, reason = cpu_native_bf16(cpuinfo(*flags))
    assert found is native and ("AVX512-BF16 or AMX" in reason) is not native


@pytest.mark.parametrize(
    "name, capability, native",
    [("Tesla V100", (7, 0), False), ("Tesla T4", (7, 5), False), ("A100", (8, 0), True), ("L40S", (8, 9), True),
     ("H100", (9, 0), True), ("B200", (10, 0), True)],
)  # fmt: skip
def test_a_gpu_computes_bf16_natively_from_compute_capability_8_0(name, capability, native):
    found, reason = cuda_native_bf16(capability, name)
    assert found is native and name in reason and ("emulated" in reason) is not native


def test_auto_follows_the_device_unless_the_deepspeed_config_decides():
    assert resolve_precision("auto", "auto", NATIVE, "f").bf16 is True
    assert resolve_precision("auto", "auto", EMULATED, "f").bf16 is False
    assert resolve_precision("auto", False, NATIVE, "f").bf16 is False
    chosen = resolve_precision("auto", True, EMULATED, "ds.json")
    assert chosen.bf16 and "bf16.enabled=true in ds.json" in chosen.describe()
    assert resolve_precision("bf16", "auto", EMULATED, "f").bf16 is True  # asked for: honoured (slow, but honoured)
    assert resolve_precision("fp32", "auto", NATIVE, "f").bf16 is False


@pytest.mark.parametrize("flag, ds_bf16", [("fp32", True), ("bf16", False)])
def test_a_precision_flag_that_contradicts_the_deepspeed_config_is_one_sentence(flag, ds_bf16):
    with pytest.raises(ConfigError, match=f"--precision {flag} contradicts bf16.enabled={str(ds_bf16).lower()}"):
        resolve_precision(flag, ds_bf16, NATIVE, "ds.json")
    with pytest.raises(ConfigError, match="--precision must be one of auto, bf16, fp32"):
        parse_args(["--precision", "fp16"])


def test_bf16_runs_accumulate_and_reduce_gradients_in_fp32_on_every_path(tmp_path):
    ds_file = tmp_path / "ds.json"
    for stage, stages in ((1, 1), (2, 1), (3, 1), (0, 2), (1, 2)):
        ds_file.write_text(json.dumps({"zero_optimization": {"stage": stage}, "pipeline": {"stages": stages}}))
        cfg = RunConfig(deepspeed_config=str(ds_file), precision="bf16", global_batch_size=16, micro_batch_size=4)
        ds, _, precision = build_ds_config(cfg, world_size=2, native_bf16=NATIVE)
        assert precision.bf16 and ds["bf16"]["enabled"] is True and ds["communication_data_type"] == "fp32"
        # a pipeline runs DeepSpeed's BF16_Optimizer, which accumulates in fp32 at any stage (and refuses the flag at 0)
        assert ds.get("data_types", {}).get("grad_accum_dtype") == ("fp32" if stage else None), (stage, stages)
    fp32, _, precision = build_ds_config(RunConfig(precision="fp32"), world_size=1, native_bf16=NATIVE)
    assert not precision.bf16 and fp32["bf16"]["enabled"] is False and "data_types" not in fp32
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(ConfigError, match="bf16 with ZeRO stage 0 .* would accumulate and reduce gradients in bf16"):
        build_ds_config(RunConfig(deepspeed_config=str(ds_file), precision="bf16"), world_size=1, native_bf16=NATIVE)


class FakeBuilder:
    def __init__(self, compatible: bool):
        self.compatible = compatible

    def is_compatible(self) -> bool:
        return self.compatible


class FakeAccelerator:
    def __init__(self, name: str, builds: bool = True):
        self.name, self.builds = name, builds

    def device_name(self) -> str:
        return self.name

    def create_op_builder(self, name: str):
        return FakeBuilder(self.builds)


def test_fused_adam_runs_where_it_is_built_in_or_can_be_built_else_torchs_fused_adamw():
    from tnf_scale.ops import fused_adam_available

    def no_toolkit():
        return "no CUDA toolkit (nvcc)"

    def never_asked():
        raise AssertionError("the CUDA toolkit is asked about only to build on CUDA")

    assert fused_adam_available(FakeAccelerator("cuda"), {"fused_adam": True}, never_asked)[0]  # prebuilt
    assert fused_adam_available(FakeAccelerator("cuda"), {}, lambda: None)[0]
    available, why = fused_adam_available(FakeAccelerator("cuda"), {}, no_toolkit)
    assert not available and "no CUDA toolkit (nvcc)" in why
    assert fused_adam_available(FakeAccelerator("cpu"), {}, never_asked)[0]  # the CPU op builds with g++
    assert not fused_adam_available(FakeAccelerator("npu", builds=False), {}, never_asked)[0]
    ds, _, _ = build_ds_config(RunConfig(), 1, NATIVE, "", fused_adam=(False, "no CUDA toolkit"))
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    ds, _, _ = build_ds_config(RunConfig(), 1, NATIVE, "", fused_adam=(True, "built"))
    assert "torch_adam" not in ds["optimizer"]["params"]


@pytest.mark.parametrize(
    ("nvcc", "torch_cuda", "problem"),
    [
        ((12, 4), "12.4", None),
        ((12, 6), "12.4", None),  # a minor difference DeepSpeed accepts
        ((11, 8), "12.4", "nvcc is CUDA 11.8 but torch was built with CUDA 12.4"),
        ((13, 0), "12.8", "nvcc is CUDA 13.0 but torch was built with CUDA 12.8"),
        (None, "12.4", "no CUDA toolkit (nvcc)"),
    ],
)
def test_fused_adam_is_built_only_with_a_cuda_toolkit_deepspeed_accepts(monkeypatch, nvcc, torch_cuda, problem):
    """An nvcc whose CUDA major version differs from torch's makes DeepSpeed raise CUDAMismatchException at the build,
    in `make install` and in every run: such a node takes torch's fused AdamW, as one without nvcc does (planted:
    deciding by CUDA_HOME alone builds on the mismatched toolkits and fails these cases)."""
    import torch
    from deepspeed.ops.op_builder import builder

    from tnf_scale.ops import cuda_toolkit_problem, fused_adam_available

    def installed_cuda_version(name=""):
        if nvcc is None:
            raise builder.MissingCUDAException("CUDA_HOME does not exist, unable to compile CUDA op(s)")
        return nvcc

    monkeypatch.setattr(builder, "installed_cuda_version", installed_cuda_version)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("DS_SKIP_CUDA_CHECK", raising=False)
    found = cuda_toolkit_problem()
    available, why = fused_adam_available(FakeAccelerator("cuda"), {}, cuda_toolkit_problem)
    if problem is None:
        assert found is None and available
    else:
        assert found is not None and found.startswith(problem) and not available and why == found


def test_deepspeeds_cpu_ops_ask_py_cpuinfo_once_per_process(monkeypatch):
    """DeepSpeed's CPU op builders ask py-cpuinfo for the -march and SIMD flags of an op each time they load one, and
    each answer is a Python subprocess (about a second): a rank asks once (planted: without the cache, twice)."""
    import cpuinfo
    from deepspeed.accelerator import get_accelerator

    from tnf_scale.ops import OPS, ask_for_the_cpu_once

    if get_accelerator().device_name() != "cpu":
        pytest.skip("the CPU op builders' question")
    asked = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: asked.append(1) or {"arch": "X86_64", "flags": ["avx2"]})
    ask_for_the_cpu_once()
    for name in OPS:
        get_accelerator().create_op_builder(name).cxx_args()
    assert len(asked) == 1
