"""The driver half of the "cpu" Triton backend.

Under ``TRITON_INTERPRET=1`` Triton runs every ``@triton.jit`` kernel as NumPy code and never
compiles, so the driver only has to answer the questions asked around a launch: which device,
which stream, which target, and how to time a call (autotuning). Device 0 is "the CPU".
"""

from __future__ import annotations

import os
import time

from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from deepspec_vllm_shims.triton_cpu import interpreter_fix

# Triton imports this module while it discovers backends, before any kernel runs: the place to
# arrange the interpreter fix in every process that uses Triton.
interpreter_fix.install()

TARGET = GPUTarget("cpu", "interpreter", 1)


def _properties(_device: int = 0) -> dict:
    # The keys Triton users read to size grids; a CPU has no shared memory or warps to speak of.
    n = os.cpu_count() or 1
    return {"multiprocessor_count": n, "max_shared_mem": 1 << 16, "max_num_regs": 1 << 16, "warpSize": 1}


class _Utils:
    get_device_properties = staticmethod(_properties)


def _bench(kernel_call, *, quantiles=None, warmup: int = 1, rep: int = 3, **_unused):
    """Wall-clock milliseconds of ``kernel_call`` (the median of ``rep`` calls, or the quantiles)."""
    for _ in range(warmup):
        kernel_call()
    times = []
    for _ in range(max(1, rep)):
        t = time.perf_counter()
        kernel_call()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    if quantiles:
        return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]
    return times[len(times) // 2]


class CPUInterpreterDriver(DriverBase):
    @classmethod
    def is_active(cls) -> bool:
        # Active only where no GPU driver can be: a CUDA/ROCm host keeps Triton's own drivers.
        import torch

        return not torch.cuda.is_available()

    def __init__(self) -> None:
        super().__init__()
        self.utils = _Utils()

    def map_python_to_cpp_type(self, ty: str) -> str:
        if ty.startswith("*"):
            return "void*"
        return {
            "i1": "bool",
            "i8": "int8_t",
            "i16": "int16_t",
            "i32": "int32_t",
            "i64": "int64_t",
            "u1": "bool",
            "u8": "uint8_t",
            "u16": "uint16_t",
            "u32": "uint32_t",
            "u64": "uint64_t",
            "fp16": "float",
            "bf16": "float",
            "fp32": "float",
            "f32": "float",
            "fp64": "double",
        }.get(ty, "void*")

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, _device: int) -> None:
        pass

    def get_current_stream(self, _device: int | None = None) -> int:
        return 0

    def get_device_interface(self):
        import torch

        return torch.cpu

    def get_benchmarker(self):
        return _bench

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(0)

    def clear_cache(self, _cache) -> None:
        pass
