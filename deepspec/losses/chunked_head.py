"""The fully chunked head (``loss.chunked_head=true``): no [positions x vocabulary] tensor at all.

The lean loss (:mod:`deepspec.losses.vocab_terms`) still receives the drafter's logits whole: with
the Markov bias, the logits' gradient and the target's logits that is several fp32 tensors of
N x V (N = batch x anchors x γ). Here the drafter hands over its final hiddens h, the Markov head's
factor z and the two output matrices instead (:class:`~deepspec.models.base.HeadFactors`), and for
each chunk of rows the loss forms

    logits = h W_headᵀ + z W2ᵀ          (and the target's logits, when lazy)

computes the per-row terms, and drops the chunk. Backward recomputes each chunk's logits, forms the
logits' gradient g as the lean loss does, and multiplies it straight out:

    dh = g W_head,   dz = g W2,   dW2 += gᵀ z

as fused linear-cross-entropy kernels do. Peak extra memory is a few chunk x V buffers; the price is
one more pass of the head matmuls in backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepspec.losses.vocab_terms import (
    HeadLogits,
    Vocab,
    _rows,
    grad_scales,
    row_grad,
    row_stats,
)

# Elements per chunk buffer (rows x V) when loss.chunk_size = 0: big enough that a chunk's matmuls
# run near the arithmetic bound (each reads the whole output matrix), small next to N x V.
HEAD_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 26}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _logits(h, w, z, w2, sel) -> torch.Tensor:
    out = torch.matmul(h[sel], w.t())
    if z is not None:
        out = out.addmm_(z[sel], w2.t())
    return out.float()


class FactoredRowStats(torch.autograd.Function):
    """(ce, soft_ce, l1) per row of the logits ``h @ w.T + z @ w2.T`` (h [N, H], z [N, r] or None);
    gradients to h, z and w2 (w, the frozen lm_head, gets none)."""

    @staticmethod
    def forward(ctx, h, z, w2, w, tgt, labels, active, chunk_rows: int, with_soft_ce: bool, vocab: Vocab):
        cd = _compute_dtype(h)
        n = h.shape[0]
        ce = torch.zeros(n, dtype=torch.float32, device=h.device)
        sce, l1 = torch.zeros_like(ce), torch.zeros_like(ce)
        hc, wc = h.to(cd), w.to(cd)
        zc, w2c = (z.to(cd), w2.to(cd)) if z is not None else (None, None)
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            for sel in _selectors(active, n, chunk_rows):
                c, s, l_ = row_stats(
                    _logits(hc, wc, zc, w2c, sel), _rows(tgt, sel), labels[sel], vocab, with_soft_ce
                )
                ce[sel], l1[sel] = c, l_
                if s is not None:
                    sce[sel] = s
        ctx.lazy_tgt = tgt if isinstance(tgt, HeadLogits) else None
        none = torch.empty(0)
        ctx.save_for_backward(
            h, z if z is not None else none, w2 if w2 is not None else none, w,
            tgt if ctx.lazy_tgt is None else none, labels, active if active is not None else none,
        )  # fmt: skip
        ctx.has_z, ctx.has_active, ctx.cd = z is not None, active is not None, cd
        ctx.chunk_rows, ctx.vocab = chunk_rows, vocab
        return ce, sce, l1

    @staticmethod
    def backward(ctx, g_ce, g_sce, g_l1):
        h, z, w2, w, tgt, labels, active = ctx.saved_tensors
        tgt = ctx.lazy_tgt if ctx.lazy_tgt is not None else tgt
        z, w2 = (z, w2) if ctx.has_z else (None, None)
        active = active if ctx.has_active else None
        n, cd = h.shape[0], ctx.cd
        g_ce, g_sce, g_l1, use_l1, use_sce = grad_scales(g_ce, g_sce, g_l1, n, h.device)
        hc, wc = h.to(cd), w.to(cd)
        zc, w2c = (z.to(cd), w2.to(cd)) if z is not None else (None, None)
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dz = torch.zeros(z.shape, dtype=torch.float32, device=h.device) if z is not None else None
        dw2 = torch.zeros(w2.shape, dtype=torch.float32, device=h.device) if z is not None else None
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            for sel in _selectors(active, n, ctx.chunk_rows):
                g = row_grad(
                    _logits(hc, wc, zc, w2c, sel), _rows(tgt, sel), labels[sel], ctx.vocab,
                    g_ce[sel], g_sce[sel], g_l1[sel], use_l1, use_sce,
                ).to(cd)  # fmt: skip
                dh[sel] = torch.matmul(g, wc).float()
                if z is not None:
                    dz[sel] = torch.matmul(g, w2c).float()
                    dw2.add_(torch.matmul(g.t(), zc[sel]).float())
        return (
            dh.to(h.dtype),
            dz.to(z.dtype) if dz is not None and ctx.needs_input_grad[1] else None,
            dw2.to(w2.dtype) if dw2 is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip


def _selectors(active: Optional[torch.Tensor], n: int, size: int):
    if active is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    return [active[s : s + size] for s in range(0, active.numel(), size)]


def factored_row_stats(f, tgt, labels, active, chunk_rows: int, with_soft_ce: bool, vocab: Vocab):
    """:class:`FactoredRowStats` over the rows of a :class:`~deepspec.models.base.HeadFactors`."""
    h = f.hidden.reshape(-1, f.hidden.shape[-1])
    z = f.markov_z.reshape(-1, f.markov_z.shape[-1]) if f.markov_z is not None else None
    if chunk_rows <= 0:
        v = max(f.lm_head.shape[0], tgt.shape[-1])
        per = HEAD_CHUNK_ELEMENTS.get(h.device.type, HEAD_CHUNK_ELEMENTS["cuda"])
        chunk_rows = max(1, per // v)
    return FactoredRowStats.apply(
        h, z, f.markov_w2, f.lm_head, tgt, labels, active, chunk_rows, with_soft_ce, vocab
    )
