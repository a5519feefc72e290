"""NumPy bodies for Triton's libdevice functions inside Triton's interpreter.

``triton.language.extra.libdevice`` holds only stubs (``def log1p(arg0): ...``): a compiler swaps
each call for the backend's device library (CUDA's ``__nv_log1pf``...), but the interpreter runs
the stub as plain Python and gets ``None`` back, so the kernel dies later with "'NoneType' object
has no attribute 'dtype'". vLLM's rejection sampler calls ``log1p`` when it resamples a rejected
draft from the residual distribution at T>0 (draft_sample_method="probabilistic").

:func:`patch` gives the stubs NumPy bodies. It runs only when the interpreter module is imported,
i.e. in a process that interprets kernels (compiled kernels never read these functions). Like the
CUDA library, float functions take fp32/fp64 only; predicates (``isnan``...) return int32.
"""

from __future__ import annotations

import math

import numpy as np

# name -> (NumPy function, result is an int32 predicate). The elementary functions plus what vLLM
# (rejection sampler, logits metrics) and torch's Triton helpers call.
UNARY = {
    "log1p": (np.log1p, False),
    "expm1": (np.expm1, False),
    "exp": (np.exp, False),
    "exp2": (np.exp2, False),
    "log": (np.log, False),
    "log2": (np.log2, False),
    "log10": (np.log10, False),
    "sqrt": (np.sqrt, False),
    "rsqrt": (lambda x: 1 / np.sqrt(x), False),
    "abs": (np.abs, False),
    "floor": (np.floor, False),
    "ceil": (np.ceil, False),
    "trunc": (np.trunc, False),
    "rint": (np.rint, False),
    # C's round(): halves away from zero (NumPy's rint rounds them to even).
    "round": (lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5), False),
    "sin": (np.sin, False),
    "cos": (np.cos, False),
    "tan": (np.tan, False),
    "asin": (np.arcsin, False),
    "acos": (np.arccos, False),
    "atan": (np.arctan, False),
    "sinh": (np.sinh, False),
    "cosh": (np.cosh, False),
    "tanh": (np.tanh, False),
    "erf": (np.vectorize(math.erf, otypes=[np.float64]), False),
    "isnan": (np.isnan, True),
    "isinf": (np.isinf, True),
    "isfinited": (np.isfinite, True),
    "signbit": (np.signbit, True),
}
BINARY = {"pow": np.power, "atan2": np.arctan2, "fmod": np.fmod, "hypot": np.hypot}


def _float_args(name, semantic, args):
    import triton.language as tl

    ts = [semantic.to_tensor(a) for a in args]
    if len(ts) == 2:
        ts = list(semantic.binary_op_type_checking_impl(ts[0], ts[1]))
    for t in ts:
        if t.dtype not in (tl.float32, tl.float64):
            # The same refusal as the CUDA library, which has no fp16/bf16/int versions either.
            raise TypeError(f"libdevice.{name} takes fp32 or fp64 in Triton's interpreter, got {t.dtype}")
    return ts


def _wrap(name, fn, predicate, semantic, tensor_handle, arity):
    import triton.language as tl

    def body(*args, _semantic=None):
        if len(args) != arity:
            raise TypeError(f"libdevice.{name} takes {arity} argument(s), got {len(args)}")
        ts = _float_args(name, semantic, args)
        with np.errstate(all="ignore"):  # inf/nan results are values here, as on a GPU
            data = np.asarray(fn(*[t.handle.data for t in ts]))
        like = ts[0]
        if predicate:
            out_ty = like.type.with_element_ty(tl.int32) if like.type.is_block() else tl.int32
            data = data.astype(np.int32)
        else:
            out_ty = like.type
            data = data.astype(like.handle.data.dtype)
        return tl.tensor(tensor_handle(data, out_ty.scalar), out_ty)

    body.__name__ = name
    body.__doc__ = f"libdevice.{name} evaluated with NumPy (Triton interpreter, deepspec shim)"
    return body


def patch(interpreter_module) -> list:
    """Replace libdevice stubs with NumPy bodies; returns the names patched."""
    from triton.language.extra import libdevice

    semantic = interpreter_module.interpreter_semantic
    handle = interpreter_module.TensorHandle
    done = []
    for name, (fn, predicate) in UNARY.items():
        if hasattr(libdevice, name):
            setattr(libdevice, name, _wrap(name, fn, predicate, semantic, handle, 1))
            done.append(name)
    for name, fn in BINARY.items():
        if hasattr(libdevice, name):
            setattr(libdevice, name, _wrap(name, fn, False, semantic, handle, 2))
            done.append(name)
    return done
