"""The fully chunked head (``loss.chunked_head=true``): no [positions x vocabulary] tensor at all.

The lean loss (:mod:`deepspec.losses.vocab_terms`) still receives the drafter's logits whole: with
the Markov bias, the logits' gradient and the target's logits that is several fp32 tensors of
N x V (N = batch x anchors x γ). Here the drafter hands over its final hiddens h, the Markov head's
factor z and the two output matrices instead (:class:`~deepspec.models.base.HeadFactors`), and for
each chunk of rows the loss forms

    logits = h W_headᵀ + z W2ᵀ          (and the target's logits, when lazy)

computes the per-row terms and drops the chunk.

The gradient is formed in the same pass, as fused linear-cross-entropy kernels do. The objective
backpropagates Σ_rows (a·ce + b·sce + c·l1) / denominator, where the per-row weights a, b, c (loss
weight x slot decay x validity) are known before the loss runs: the caller passes them as
``row_weights``, and each chunk's logit gradient g (the formulas of vocab_terms.py) goes straight into

    dh = g W_head,   dz = g W2,   dW2 += gᵀ z

so every V-wide matmul and softmax runs once. Backward only scales these by the scalar that reached
it. If the gradients that reach the terms are not a scalar multiple of ``row_weights`` (another use
of the per-row terms), or none were given, backward recomputes each chunk's logits and forms the
gradient from what it received: slower, never wrong.

The same pass takes each row's draft and target argmax when asked (the greedy confidence event), and
on a multi-core CPU runs one chunk per thread (vocab_terms._for_each), dW2's accumulation under a lock.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch

from deepspec.losses.vocab_terms import (
    HeadLogits,
    Vocab,
    _for_each,
    _rowdot,
    _rows,
    grad_scales,
    row_grad,
    row_stats,
)

# Rows per chunk when loss.chunk_size = 0: this many elements over max(d, V / 2) (a chunk holds ~4
# buffers of its draft logits' width d and 2 of the target's V), and at least 1/HEAD_MAX_CHUNKS of
# the rows. Each chunk reads the whole output matrices, so bigger chunks run closer to the arithmetic
# bound; on a multi-core CPU one chunk per thread is in flight, and these buffers are the loss's whole
# working memory. The floor keeps small batches lean; the chunk cap keeps large ones from re-reading
# the matrices a hundred times (docs/benchmarks.md, section 2: at 1,792 rows of a 151,936 vocabulary,
# 20-row chunks took x1.24 the time of lean_lazy, 112-row chunks x0.90, at x0.35 its memory).
HEAD_CHUNK_ELEMENTS = {"cpu": 3 << 20, "cuda": 1 << 26}
HEAD_MAX_CHUNKS = 16


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _logits(h, w, z, w2, sel) -> torch.Tensor:
    out = torch.matmul(h[sel], w.t())
    if z is not None:
        out = out.addmm_(z[sel], w2.t())
    return out.float()


def fused_chunk(draft_rows, target_rows, lab, vocab: Vocab, with_soft_ce: bool, wc, ws, wl, use_l1, use_sce):
    """(ce, soft_ce, l1, g) of one chunk, fp32: the per-row terms of vocab_terms.row_stats and
    g = d(wc·ce + ws·sce + wl·l1)/dz (vocab_terms.row_grad), each softmax formed once.

    ``draft_rows()`` / ``target_rows()`` form the chunk's logits: called here, one after the other,
    so that each [c, V] logits buffer is gone once its softmax exists (the working set stays ~4 buffers).
    """
    p, out = _target_probs(target_rows(), vocab)
    logq = torch.log_softmax(draft_rows(), dim=-1)
    ok = lab >= 0
    idx = lab.clamp(min=0).unsqueeze(1)
    ce = -torch.gather(logq, 1, idx).squeeze(1) * ok
    sce = -_rowdot(p, logq) if with_soft_ce else None
    q = logq.exp_()  # exp(log_softmax), as the other paths: sign(q - p) agrees with the L1 value
    s = torch.sub(q, p)
    l1 = s.abs().sum(-1)
    if out is not None:
        l1 = l1 + out
    wc = wc * ok  # a label that cannot be drafted adds no CE, so no gradient either
    qs = wc + ws * p.sum(-1) if (use_sce and vocab.ids is not None) else wc + ws
    if use_l1:  # q ⊙ (s - <s, q>) · w_l1
        s.sign_()
        sq = _rowdot(s, q).unsqueeze(1)
        g = s.sub_(sq).mul_(q).mul_(wl.unsqueeze(1))
        g.addcmul_(q, qs.unsqueeze(1))
    else:
        g = s.copy_(q).mul_(qs.unsqueeze(1))
    if use_sce:
        g.addcmul_(p, ws.unsqueeze(1), value=-1.0)
    g.scatter_add_(1, idx, -wc.unsqueeze(1))
    return ce, sce, l1, g


def _target_probs(t: torch.Tensor, vocab: Vocab):
    """p over the draft vocabulary and the target's mass outside it (None when full), as
    Vocab.target_probs but cheaper for a draft vocabulary: past the log-sum-exp only its d columns
    are exponentiated, and the outside mass is what they leave of 1."""
    if vocab.ids is None:
        return torch.softmax(t, dim=-1), None
    p = t.index_select(1, vocab.ids).sub_(torch.logsumexp(t, dim=-1, keepdim=True)).exp_()
    return p, (1.0 - p.sum(-1)).clamp_(min=0.0)


class FactoredRowStats(torch.autograd.Function):
    """(ce, soft_ce, l1) per row of the logits ``h @ w.T + z @ w2.T`` (h [N, H], z [N, r] or None);
    gradients to h, z and w2 (w, the frozen lm_head, gets none). ``row_weights`` [3, N] (or None):
    the weights of ce, soft_ce and l1 in the loss, up to one scalar; with them the gradients are
    formed in the forward."""

    @staticmethod
    def forward(
        ctx, h, z, w2, w, tgt, labels, active, chunk_rows: int, with_soft_ce: bool, vocab: Vocab, row_weights,
        argmax=None,
    ):  # fmt: skip
        cd = _compute_dtype(h)
        n = h.shape[0]
        ce = torch.zeros(n, dtype=torch.float32, device=h.device)
        sce, l1 = torch.zeros_like(ce), torch.zeros_like(ce)
        hc, wc = h.to(cd), w.to(cd)
        zc, w2c = (z.to(cd), w2.to(cd)) if z is not None else (None, None)
        fused = None
        if row_weights is not None:
            rw = row_weights.float()
            if active is not None:  # rows without weight get none here either
                rw = torch.zeros_like(rw).index_copy_(1, active, rw.index_select(1, active))
            use_l1, use_sce = bool(rw[2].any()), bool(rw[1].any())
            f32 = dict(dtype=torch.float32, device=h.device)
            fused = {
                "weights": rw,
                "dh": torch.zeros(h.shape, **f32),
                "dz": torch.zeros(z.shape, **f32) if z is not None else None,
                "dw2": torch.zeros(w2.shape, **f32) if z is not None else None,
            }
        lock = threading.Lock()
        if argmax is not None:
            argmax.update(
                draft=torch.zeros(n, dtype=torch.long, device=h.device),
                target=torch.zeros_like(ce, dtype=torch.long),
            )

        def draft_rows(sel):
            return _noting_argmax(_logits(hc, wc, zc, w2c, sel), sel, argmax, "draft")

        def target_rows(sel):
            return _noting_argmax(_rows(tgt, sel), sel, argmax, "target")

        def chunk(sel):  # fp32 no-grad; chunks write disjoint rows, dW2 under the lock
            if fused is None:
                c, s, l_ = row_stats(draft_rows(sel), target_rows(sel), labels[sel], vocab, with_soft_ce)
            else:
                rw = fused["weights"][:, sel]
                c, s, l_, g = fused_chunk(
                    lambda: draft_rows(sel), lambda: target_rows(sel),
                    labels[sel], vocab, with_soft_ce, rw[0], rw[1], rw[2], use_l1, use_sce,
                )  # fmt: skip
                _multiply_out(g.to(cd), sel, wc, zc, w2c, fused, lock)
            ce[sel], l1[sel] = c, l_
            if s is not None:
                sce[sel] = s

        _for_each(chunk, _selectors(active, n, chunk_rows), h.device)
        ctx.lazy_tgt = tgt if isinstance(tgt, HeadLogits) else None
        none = torch.empty(0)
        ctx.save_for_backward(
            h, z if z is not None else none, w2 if w2 is not None else none, w,
            tgt if ctx.lazy_tgt is None else none, labels, active if active is not None else none,
        )  # fmt: skip
        ctx.has_z, ctx.has_active, ctx.cd = z is not None, active is not None, cd
        ctx.chunk_rows, ctx.vocab, ctx.fused = chunk_rows, vocab, fused
        return ce, sce, l1

    @staticmethod
    def backward(ctx, g_ce, g_sce, g_l1):
        h, z, w2, w, tgt, labels, active = ctx.saved_tensors
        z, w2 = (z, w2) if ctx.has_z else (None, None)
        active = active if ctx.has_active else None
        n = h.shape[0]
        g_ce, g_sce, g_l1, use_l1, use_sce = grad_scales(g_ce, g_sce, g_l1, n, h.device)
        fused, ctx.fused = ctx.fused, None  # used once: a second backward (retain_graph) recomputes
        scale = _common_scale(fused["weights"], (g_ce, g_sce, g_l1), active) if fused is not None else None
        if scale is not None:
            dh, dz, dw2 = (
                t.mul_(scale) if t is not None else None for t in (fused["dh"], fused["dz"], fused["dw2"])
            )
        else:
            tgt = ctx.lazy_tgt if ctx.lazy_tgt is not None else tgt
            dh, dz, dw2 = _recompute_grads(
                ctx, h, z, w2, w, tgt, labels, active, (g_ce, g_sce, g_l1), use_l1, use_sce
            )
        return (
            dh.to(h.dtype),
            dz.to(z.dtype) if dz is not None and ctx.needs_input_grad[1] else None,
            dw2.to(w2.dtype) if dw2 is not None and ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _noting_argmax(x: torch.Tensor, sel, out: Optional[dict], key: str) -> torch.Tensor:
    """``x`` (a chunk's logits), its rows' argmax written to ``out[key][sel]`` first when asked."""
    if out is not None:
        out[key][sel] = x.argmax(-1)
    return x


def _multiply_out(g, sel, w, z, w2, acc, lock=None) -> None:
    """dh[sel] = g W, dz[sel] = g W2, dW2 += gᵀ z[sel] (fp32 accumulators; ``lock`` guards dW2)."""
    acc["dh"][sel] = torch.matmul(g, w).float()
    if z is not None:
        acc["dz"][sel] = torch.matmul(g, w2).float()
        with lock if lock is not None else contextlib.nullcontext():
            if g.dtype == torch.float32:
                acc["dw2"].addmm_(g.t(), z[sel])
            else:
                acc["dw2"].add_(torch.matmul(g.t(), z[sel]))


def _common_scale(weights: torch.Tensor, grads, active) -> Optional[float]:
    """The scalar s with grads = s · weights (on the rows that carry weight), or None if there is none."""
    got = torch.stack(grads)
    if active is not None:
        got, weights = got.index_select(1, active), weights.index_select(1, active)
    norm = float((weights * weights).sum())
    s = float((got * weights).sum()) / norm if norm > 0 else 0.0
    err = float((got - s * weights).abs().max()) if got.numel() else 0.0
    tol = 1e-5 * max(float(got.abs().max()) if got.numel() else 0.0, 1e-30)
    return s if err <= tol else None


def _recompute_grads(ctx, h, z, w2, w, tgt, labels, active, grads, use_l1: bool, use_sce: bool):
    """The gradients for arbitrary per-row gradients of the terms: each chunk's logits formed again."""
    g_ce, g_sce, g_l1 = grads
    cd = ctx.cd
    hc, wc = h.to(cd), w.to(cd)
    zc, w2c = (z.to(cd), w2.to(cd)) if z is not None else (None, None)
    f32 = dict(dtype=torch.float32, device=h.device)
    acc = {
        "dh": torch.zeros(h.shape, **f32),
        "dz": torch.zeros(z.shape, **f32) if z is not None else None,
        "dw2": torch.zeros(w2.shape, **f32) if z is not None else None,
    }
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        for sel in _selectors(active, h.shape[0], ctx.chunk_rows):
            g = row_grad(
                _logits(hc, wc, zc, w2c, sel), _rows(tgt, sel), labels[sel], ctx.vocab,
                g_ce[sel], g_sce[sel], g_l1[sel], use_l1, use_sce,
            )  # fmt: skip
            _multiply_out(g.to(cd), sel, wc, zc, w2c, acc)
    return acc["dh"], acc["dz"], acc["dw2"]


def _selectors(active: Optional[torch.Tensor], n: int, size: int):
    if active is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    return [active[s : s + size] for s in range(0, active.numel(), size)]


def factored_row_stats(
    f, tgt, labels, active, chunk_rows: int, with_soft_ce: bool, vocab: Vocab, row_weights=None, argmax=None
):
    """:class:`FactoredRowStats` over the rows of a :class:`~deepspec.models.base.HeadFactors`.
    ``row_weights`` [3, ...] (same rows as ``labels``): see :class:`FactoredRowStats`; ``argmax``:
    see :func:`~deepspec.losses.vocab_terms.block_row_stats`."""
    h = f.hidden.reshape(-1, f.hidden.shape[-1])
    z = f.markov_z.reshape(-1, f.markov_z.shape[-1]) if f.markov_z is not None else None
    if chunk_rows <= 0:
        width = max(f.lm_head.shape[0], tgt.shape[-1] // 2)
        per = HEAD_CHUNK_ELEMENTS.get(h.device.type, HEAD_CHUNK_ELEMENTS["cuda"])
        chunk_rows = max(1, per // width, -(-h.shape[0] // HEAD_MAX_CHUNKS))
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (h, z, f.markov_w2)
    )
    if row_weights is not None:
        row_weights = row_weights.reshape(3, -1).detach() if wants_grad else None
    return FactoredRowStats.apply(
        h,
        z,
        f.markov_w2,
        f.lm_head,
        tgt,
        labels,
        active,
        chunk_rows,
        with_soft_ce,
        vocab,
        row_weights,
        argmax,
    )
