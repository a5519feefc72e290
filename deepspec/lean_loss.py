"""Per-slot CE, soft CE and L1(q, p) without full-vocabulary fp32 probabilities of the whole batch.

The literal loss (SPEC §3) takes ``log_softmax`` of the draft logits and ``softmax`` of the target
logits over the vocabulary for every block slot at once and lets autograd keep them (and |q - p|,
exp(logq), ...) for backward: several fp32 tensors of N × V (N = batch × anchors × γ, V = 151,936
for Qwen3). :class:`BlockRowStats` instead walks the rows in chunks: the forward keeps only the
three per-row numbers, the backward recomputes each chunk's softmaxes and writes that chunk of the
gradient. Peak extra memory is a few chunk × V buffers plus the gradient of the logits itself.

Per row (z = draft logits, logq = log_softmax(z), q = exp(logq), p = softmax(target logits),
y = label):

    ce   = -logq[y]                 d/dz = q - onehot(y)
    sce  = -Σ p·logq  (soft CE)     d/dz = q·Σp - p = q - p
    l1   = Σ |q - p|                d/dz = q ⊙ (s - <s, q>),  s = sign(q - p)

(the l1 gradient is what autograd gives the literal expression, including sign(0) = 0). The values
are the same operations as the literal version, row by row, so they agree to float rounding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # ~8 MB of fp32 per chunk buffer


def auto_chunk_rows(vocab: int, chunk_rows: int = 0) -> int:
    """Rows per chunk: ``chunk_rows`` if > 0, else about DEFAULT_CHUNK_ELEMENTS / V (at least 1)."""
    if chunk_rows > 0:
        return int(chunk_rows)
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row, without an a·b temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _chunks(active: Optional[torch.Tensor], n: int, size: int):
    """Yield (row selector, index tensor or None): slices over all rows, or pieces of ``active``."""
    if active is None:
        for s in range(0, n, size):
            yield slice(s, min(s + size, n)), None
    else:
        for s in range(0, active.numel(), size):
            idx = active[s : s + size]
            yield idx, idx


def _rows(x: torch.Tensor, sel) -> torch.Tensor:
    return x[sel].float()  # a view for slices of fp32 input, a chunk-sized copy otherwise


class BlockRowStats(torch.autograd.Function):
    """(ce, soft_ce, l1) per row of ``logits`` [N, V] against ``tgt_logits`` [N, V] and ``labels`` [N].

    ``active`` (1-D long, sorted) restricts the work to rows that carry weight; the others get 0 and
    a zero gradient. Only ``logits`` receives a gradient.
    """

    @staticmethod
    def forward(ctx, logits, tgt_logits, labels, active, chunk_rows: int, with_soft_ce: bool):
        n = logits.shape[0]
        ce = torch.zeros(n, dtype=torch.float32, device=logits.device)
        sce = torch.zeros_like(ce)
        l1 = torch.zeros_like(ce)
        with torch.no_grad():
            for sel, _ in _chunks(active, n, chunk_rows):
                logq = torch.log_softmax(_rows(logits, sel), dim=-1)
                ce[sel] = -torch.gather(logq, 1, labels[sel].unsqueeze(1)).squeeze(1)
                p = torch.softmax(_rows(tgt_logits, sel), dim=-1)
                if with_soft_ce:
                    sce[sel] = -_rowdot(p, logq)
                q = logq.exp_()
                l1[sel] = q.sub_(p).abs_().sum(-1)
                del logq, q, p
        ctx.save_for_backward(logits, tgt_logits, labels, active if active is not None else torch.empty(0))
        ctx.has_active = active is not None
        ctx.chunk_rows = chunk_rows
        return ce, sce, l1

    @staticmethod
    def backward(ctx, g_ce, g_sce, g_l1):
        logits, tgt_logits, labels, active = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        active = active if ctx.has_active else None
        n = logits.shape[0]
        zeros = torch.zeros(n, dtype=torch.float32, device=logits.device)
        g_ce = zeros if g_ce is None else g_ce.float()
        g_sce = zeros if g_sce is None else g_sce.float()
        use_l1 = g_l1 is not None and bool(g_l1.any())
        use_sce = bool(g_sce.any())
        g_l1 = zeros if g_l1 is None else g_l1.float()
        full = active is None or active.numel() == n
        grad = (torch.empty_like if full else torch.zeros_like)(logits)
        with torch.no_grad():
            for sel, _ in _chunks(active, n, ctx.chunk_rows):
                # exp(log_softmax) as in the forward (and the literal version), so that sign(q - p)
                # agrees with it even where q and p differ only by rounding.
                q = torch.log_softmax(_rows(logits, sel), dim=-1).exp_()
                gc, gs, gl = g_ce[sel], g_sce[sel], g_l1[sel]
                if use_l1 or use_sce:
                    p = torch.softmax(_rows(tgt_logits, sel), dim=-1)
                if use_l1:
                    s = torch.sub(q, p).sign_()
                    g = s.sub_(_rowdot(s, q).unsqueeze(1)).mul_(q).mul_(gl.unsqueeze(1))
                    g.addcmul_(q, (gc + gs).unsqueeze(1))
                else:
                    g = q.mul_((gc + gs).unsqueeze(1))
                if use_sce:
                    g.addcmul_(p, gs.unsqueeze(1), value=-1.0)
                g.scatter_add_(1, labels[sel].unsqueeze(1), -gc.unsqueeze(1))
                grad[sel] = g.to(grad.dtype)
                del q, g
        return grad, None, None, None, None, None


def block_row_stats(
    logits: torch.Tensor,
    tgt_logits: torch.Tensor,
    labels: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    chunk_rows: int = 0,
    with_soft_ce: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits/tgt_logits [..., V], labels [...] -> (ce, soft_ce, l1), each [...] fp32.

    ``valid`` [...] (optional): rows where it is 0 are skipped (their values and gradients are 0).
    """
    shape = labels.shape
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    t = tgt_logits.reshape(-1, v)
    y = labels.reshape(-1)
    active = None
    if valid is not None:
        mask = valid.reshape(-1) > 0
        if not bool(mask.all()):
            active = torch.nonzero(mask).flatten()
    ce, sce, l1 = BlockRowStats.apply(z, t, y, active, auto_chunk_rows(v, chunk_rows), with_soft_ce)
    return ce.view(shape), sce.view(shape), l1.view(shape)


def reference_row_stats(logits, tgt_logits, labels, with_soft_ce: bool = False):
    """The literal version: full-vocabulary fp32 log-softmax and softmax of both, autograd keeps them."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    ce = -torch.gather(logq, -1, labels.unsqueeze(-1)).squeeze(-1)
    p = torch.softmax(tgt_logits.float(), dim=-1)
    sce = -(p * logq).sum(-1) if with_soft_ce else torch.zeros_like(ce)
    l1 = (logq.exp() - p).abs().sum(-1)
    return ce, sce, l1
