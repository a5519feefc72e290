"""Attention under an explicit visibility rule: SDPA with a dense boolean mask, or flex attention.

A drafter states *who may see whom* once, as an :class:`AttnMask`: a ``mask_mod(b, h, q, kv)``
predicate (what flex attention compiles into a sparse block mask) plus a function building the same
rule as a dense ``[B, 1, Q, K]`` boolean tensor (what SDPA takes). :func:`attend` picks the kernel:

* ``sdpa``  - ``F.scaled_dot_product_attention`` with the dense mask (CPU default, always available);
* ``flex``  - ``torch.nn.attention.flex_attention`` with a block mask (compiled on CUDA, where it skips
  fully masked tiles; on CPU it runs PyTorch's unfused reference, which the tests use to check that
  both forms of a rule agree);
* ``auto``  - flex on CUDA when it imports, else sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

try:  # flex attention appeared in torch 2.5; keep older/odd builds working on the SDPA path
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except Exception:  # pragma: no cover - depends on the torch build
    create_block_mask = flex_attention = None
    HAS_FLEX = False

_compiled_flex = None


@dataclass
class AttnMask:
    """One visibility rule in both forms. ``q_len``/``kv_len`` are per batch row."""

    batch: int
    q_len: int
    kv_len: int
    dense_fn: Callable[[], torch.Tensor]  # -> bool [B, 1, Q, K], True = may attend
    mask_mod: Callable  # (b, h, q_idx, kv_idx) -> bool tensor, the same rule elementwise
    device: torch.device
    _dense: Optional[torch.Tensor] = None
    _block: Optional[object] = None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self.dense_fn()
        return self._dense

    def block_mask(self):
        if self._block is None:
            self._block = create_block_mask(
                self.mask_mod, self.batch, None, self.q_len, self.kv_len, device=self.device
            )
        return self._block


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return "flex" if HAS_FLEX and device.type == "cuda" else "sdpa"
    if impl == "flex" and not HAS_FLEX:
        raise RuntimeError(
            "model.attn_impl=flex but this torch build has no torch.nn.attention.flex_attention; "
            "use attn_impl=sdpa or auto"
        )
    if impl not in ("sdpa", "flex"):
        raise ValueError(f"attn_impl={impl!r}: expected auto, sdpa or flex")
    return impl


def _flex_fn(device: torch.device):
    global _compiled_flex
    if device.type != "cuda":
        return flex_attention  # eager reference implementation (tests, debugging)
    if _compiled_flex is None:
        # Default dynamism: after the first new sequence length the lengths become symbolic, so
        # varying context lengths (every batch, every decoding round) do not recompile each time.
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, impl: str = "sdpa", scale: Optional[float] = None
) -> torch.Tensor:
    """q [B, Hq, Q, D]; k/v [B, Hkv, K, D] (Hq a multiple of Hkv); mask an AttnMask or a dense bool tensor.
    ``scale`` multiplies the scores (None: 1/sqrt(D); Gemma 4 uses 1)."""
    if not isinstance(mask, AttnMask):  # a plain dense mask: SDPA only
        impl, dense = "sdpa", mask
    else:
        impl = resolve_impl(impl, q.device)
        dense = None
    if impl == "flex":
        out = _flex_fn(q.device)(
            q, k, v, block_mask=mask.block_mask(), enable_gqa=k.shape[1] != q.shape[1], scale=scale
        )
        return out
    if dense is None:
        dense = mask.dense()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
