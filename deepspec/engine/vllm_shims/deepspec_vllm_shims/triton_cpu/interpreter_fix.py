"""Fixes for Triton's interpreter, applied when it is first imported (so only in a process that
interprets kernels).

1. In the interpreter, ``mask & flag`` of a block mask and a scalar comparison comes out as int32
instead of bool, and the masked load/store then fails with "mask has unsupported dtype". vLLM's
Gumbel sampler (draft_sample_method="probabilistic") stores with such a mask. Compiled Triton
treats any nonzero mask element as true; the interpreter gets the same by casting to bool.
2. libdevice functions are stubs the interpreter cannot run; ``libdevice_np`` gives them NumPy
   bodies (vLLM's rejection sampler needs ``log1p`` at T>0).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODULE = "triton.runtime.interpreter"


def patch(module) -> None:
    import numpy as np

    from deepspec_vllm_shims.triton_cpu import libdevice_np

    builder = module.InterpreterBuilder
    if getattr(builder, "_deepspec_mask_fix", False):
        return
    handle = module.TensorHandle
    load, store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask):
        if mask.data.dtype == np.bool_:
            return mask
        return handle(mask.data.astype(np.bool_), mask.dtype)

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        return load(self, ptrs, as_bool(mask), other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        return store(self, ptrs, value, as_bool(mask), cache_policy)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder._deepspec_mask_fix = True
    libdevice_np.patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if MODULE in sys.modules:
        patch(sys.modules[MODULE])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
