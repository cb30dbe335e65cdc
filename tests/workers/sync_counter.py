"""Counts the host's reads of device values: on a GPU each one makes the host wait for the device's queue.

On this CPU nothing waits, so the counter sees what would, in two modes entered together:
- Python-level reads (a TorchFunctionMode): the Tensor methods that hand a value to Python (`item`, `tolist`,
  `cpu`, `numpy`, `__array__`, `__bool__`, `__int__`, `__float__`, `__index__`, `__format__`, `equal`,
  `is_nonzero`), and the factories that copy Python values to a device (`torch.tensor` / `torch.as_tensor` given a
  device: on CUDA a blocking copy waits for the stream). The ops such a call dispatches are not counted again.
- Ops whose output size or value the host needs (a TorchDispatchMode), matched by overload packet (every overload
  of the op): `_local_scalar_dense`, `nonzero`, the `unique` family, `bincount`, `repeat_interleave` without
  `output_size`, `masked_select`, `equal`, `is_nonzero`, and `index` / `index_put` with a boolean mask.
Limits: a copy between tensors (`.to`) cannot be told from a no-op on a CPU, so it is not counted; the step's one
such copy, the batch's, comes pinned and non-blocking from the prefetcher on a GPU.

Each read is charged to the innermost frame of a named owner (a folder: this project's package, a library's), as
"kind @ owner" with the file and function for this project's code, or "kind @ other".
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op overload packets -> kind
SYNCING_OPS = {
    aten._local_scalar_dense: "item",
    aten.nonzero: "nonzero",
    aten._unique: "unique",
    aten._unique2: "unique",
    aten.unique_dim: "unique",
    aten.unique_consecutive: "unique_consecutive",
    aten.unique_dim_consecutive: "unique_consecutive",
    aten.bincount: "bincount",
    aten.repeat_interleave: "repeat_interleave",
    aten.masked_select: "masked_select",
    aten.equal: "equal",
    aten.is_nonzero: "is_nonzero",
}
BOOLEAN_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
PYTHON_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.__array__: "numpy",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.__format__: "format",
    torch.Tensor.equal: "equal",
    torch.equal: "equal",
    torch.Tensor.is_nonzero: "is_nonzero",
    torch.is_nonzero: "is_nonzero",
}
FACTORIES = {torch.tensor, torch.as_tensor}
KINDS = sorted({*SYNCING_OPS.values(), *PYTHON_READS.values(), "boolean index", "copy of Python values"})


class _PythonReads(TorchFunctionMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = PYTHON_READS.get(func)
        if kind is None and func in FACTORIES and kwargs.get("device") is not None:
            data = args[0] if args else kwargs.get("data")
            kind = None if isinstance(data, torch.Tensor) else "copy of Python values"
        if kind is None or self.counter.inside:
            return func(*args, **kwargs)
        self.counter.record(kind)
        self.counter.inside = True
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.inside = False


class _DeviceReads(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        kind = SYNCING_OPS.get(packet)
        if packet is aten.repeat_interleave and kwargs.get("output_size") is not None:
            kind = None
        if kind is None and packet in BOOLEAN_INDEXED:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or []):
                kind = "boolean index"
        if kind is not None and not self.counter.inside:
            self.counter.record(kind)
        return func(*args, **kwargs)


class SyncCounter:
    """`with counter.counting():` counts the host reads made inside into `counter.counts` ({"kind @ owner": n});
    `owners` maps a name to the folder (or file) whose frames it owns; the innermost owned frame is charged."""

    def __init__(self, owners: dict[str, Path], detailed: tuple[str, ...] = ()):
        """Reads owned by a name in `detailed` are charged to its file and function, e.g. "tnf_scale/spans.py:f"."""
        self.owners = {name: str(Path(path).resolve()) for name, path in owners.items()}
        self.detailed = detailed
        self.counts: Counter = Counter()
        self.inside = False
        self._modes: list = []

    def owner(self) -> str:
        frame = sys._getframe(1)
        while frame is not None:
            filename = str(Path(frame.f_code.co_filename).resolve())
            for name, root in self.owners.items():
                if filename == root or filename.startswith(root + "/"):
                    if name not in self.detailed:
                        return name
                    relative = Path(filename).relative_to(Path(root).parent)
                    return f"{relative}:{frame.f_code.co_name}"
            frame = frame.f_back
        return "other"

    def record(self, kind: str) -> None:
        self.counts[f"{kind} @ {self.owner()}"] += 1

    def start(self) -> None:
        """Begin counting (until `stop`): the modes are entered here and left there, so a count may span calls."""
        self._modes = [_PythonReads(self), _DeviceReads(self)]
        for mode in self._modes:
            mode.__enter__()

    def stop(self) -> dict[str, int]:
        """End counting; returns the counts since `start` and clears them."""
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []
        counts, self.counts = dict(sorted(self.counts.items())), Counter()
        return counts

    @property
    def running(self) -> bool:
        return bool(self._modes)

    @contextlib.contextmanager
    def paused(self):
        """Nothing is counted inside (host work on host tensors, e.g. collation)."""
        was, self.inside = self.inside, True
        try:
            yield
        finally:
            self.inside = was
