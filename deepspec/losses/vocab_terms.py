"""Per-slot CE, soft CE and L1(q, p) without full-vocabulary fp32 probabilities of the whole batch.

The literal loss (docs/method.md, Losses) takes ``log_softmax`` of the draft logits and ``softmax`` of the target
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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

# Elements per chunk buffer when loss.chunk_size = 0 (auto). CPU: cache-sized chunks are fastest
# (2 MB of fp32, 3 rows of a Qwen3 vocabulary); GPU: big chunks keep kernel launches few (128 MB).
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 25}
LAZY_MIN_ROWS = 32  # auto chunks with lazy target logits: at least this many rows per lm_head pass


@dataclass
class HeadLogits:
    """Logits ``hidden @ weight.T`` that are never stored whole: the lean loss computes them a chunk
    of rows at a time (the target's logits: its final hidden states and its frozen lm_head)."""

    hidden: torch.Tensor  # [..., H]
    weight: torch.Tensor  # [V, H]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.weight.shape[0]))

    def reshape_rows(self) -> HeadLogits:
        return HeadLogits(self.hidden.reshape(-1, self.hidden.shape[-1]), self.weight)

    def rows(self, sel) -> torch.Tensor:
        # Same dtype in forward and backward (autocast is off in backward): compute in weight's dtype.
        with torch.no_grad(), torch.autocast(self.hidden.device.type, enabled=False):
            return torch.matmul(self.hidden[sel].to(self.weight.dtype), self.weight.t()).float()

    def materialize(self) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.hidden.device.type, enabled=False):
            return torch.matmul(self.hidden.to(self.weight.dtype), self.weight.t())


Logits = Union[torch.Tensor, HeadLogits]


def auto_chunk_rows(vocab: int, chunk_rows: int = 0, device: Union[str, torch.device] = "cpu") -> int:
    """Rows per chunk: ``chunk_rows`` if > 0, else about CHUNK_ELEMENTS[device] / V (at least 1)."""
    if chunk_rows > 0:
        return int(chunk_rows)
    dev = torch.device(device).type
    return max(1, CHUNK_ELEMENTS.get(dev, CHUNK_ELEMENTS["cuda"]) // max(1, vocab))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a·b per row. Multiply-then-sum (torch's sum is cascaded, as in the literal version): a
    BLAS dot over 151,936 fp32 terms loses ~3x more precision."""
    return (a * b).sum(-1)


def _chunks(active: Optional[torch.Tensor], n: int, size: int) -> List:
    """Row selectors: slices over all rows, or pieces of the index tensor ``active``."""
    if active is None:
        return [slice(s, min(s + size, n)) for s in range(0, n, size)]
    return [active[s : s + size] for s in range(0, active.numel(), size)]


def _rows(x: Logits, sel) -> torch.Tensor:
    if isinstance(x, HeadLogits):
        return x.rows(sel)
    return x[sel].float()  # a view for slices of fp32 input, a chunk-sized copy otherwise


_POOLS: Dict[int, ThreadPoolExecutor] = {}


def _for_each(fn: Callable, chunks: List, device: torch.device) -> None:
    """Run ``fn(chunk)`` for every chunk, fp32, no autograd.

    On a multi-threaded CPU the chunks are spread over that many Python threads, each running its
    ops single-threaded: many small ops each paying an OpenMP fork/join (and, on a busy machine,
    waiting for a descheduled worker at every barrier) are what makes naive chunking slow there.
    Chunks write disjoint rows, so the threads never touch the same memory.
    """
    threads = torch.get_num_threads()

    def run(c):
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            fn(c)

    if device.type != "cpu" or threads <= 1 or len(chunks) < 2:
        for c in chunks:
            run(c)
        return
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lean-loss")
    torch.set_num_threads(1)
    try:
        list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(threads)


class Vocab:
    """How the draft vocabulary sits in the target's (None throughout for a whole-vocabulary drafter).

    ``ids`` [d]: target id of each draft id; ``outside`` [V]: True where a target token cannot be
    drafted. Labels reach the loss already mapped to draft ids, -1 where they cannot be drafted.
    """

    def __init__(self, ids: Optional[torch.Tensor], vocab_size: int = 0) -> None:
        self.ids = ids
        self.outside = None
        if ids is not None:
            self.outside = torch.ones(vocab_size, dtype=torch.bool, device=ids.device)
            self.outside[ids] = False

    def target_probs(self, tgt_rows: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """p over the draft vocabulary [c, d] and the target's mass outside it [c] (None when full)."""
        p = torch.softmax(tgt_rows, dim=-1)
        if self.ids is None:
            return p, None
        return p.index_select(1, self.ids), p.masked_fill_(~self.outside, 0.0).sum(-1)


def row_stats(zrows, tgt_rows, lab, vocab: Vocab, with_soft_ce: bool):
    """(ce, soft_ce, l1) of one chunk of rows (fp32). A label that cannot be drafted (-1) adds no CE;
    the target mass outside the draft vocabulary adds to L1 (q is 0 there: |0 - p| = p)."""
    logq = torch.log_softmax(zrows, dim=-1)
    ok = lab >= 0
    ce = -torch.gather(logq, 1, lab.clamp(min=0).unsqueeze(1)).squeeze(1) * ok
    p, out = vocab.target_probs(tgt_rows)
    sce = -_rowdot(p, logq) if with_soft_ce else None
    l1 = logq.exp_().sub_(p).abs_().sum(-1)
    if out is not None:
        l1 = l1 + out
    return ce, sce, l1


def row_grad(zrows, tgt_rows, lab, vocab: Vocab, gc, gs, gl, use_l1: bool, use_sce: bool) -> torch.Tensor:
    """d(gc·ce + gs·sce + gl·l1)/dz for one chunk of rows (fp32 [c, d])."""
    # exp(log_softmax) as in the forward (and the literal version), so that sign(q - p) agrees with
    # it even where q and p differ only by rounding.
    q = torch.log_softmax(zrows, dim=-1).exp_()
    if use_l1 or use_sce:
        p, _ = vocab.target_probs(tgt_rows)
    # soft CE: d/dz = q·Σp - p (Σp = 1 over the whole vocabulary, less over a draft vocabulary)
    ok = lab >= 0
    gc = gc * ok  # a label that cannot be drafted adds no CE, so no gradient either
    qs = gc + gs if not (use_sce and vocab.ids is not None) else gc + gs * p.sum(-1)
    if use_l1:  # q ⊙ (s - <s, q>) · g_l1
        s = torch.sub(q, p).sign_()
        g = s.sub_(_rowdot(s, q).unsqueeze(1)).mul_(q).mul_(gl.unsqueeze(1))
        g.addcmul_(q, qs.unsqueeze(1))
    else:
        g = q.mul_(qs.unsqueeze(1))
    if use_sce:
        g.addcmul_(p, gs.unsqueeze(1), value=-1.0)
    g.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), -gc.unsqueeze(1))
    return g


def grad_scales(g_ce, g_sce, g_l1, n: int, device):
    zeros = torch.zeros(n, dtype=torch.float32, device=device)
    g_ce = zeros if g_ce is None else g_ce.float()
    g_sce = zeros if g_sce is None else g_sce.float()
    use_l1 = g_l1 is not None and bool(g_l1.any())
    g_l1 = zeros if g_l1 is None else g_l1.float()
    return g_ce, g_sce, g_l1, use_l1, bool(g_sce.any())


class BlockRowStats(torch.autograd.Function):
    """(ce, soft_ce, l1) per row of ``logits`` [N, d] against ``tgt_logits`` [N, V] (a tensor, or a
    :class:`HeadLogits` with hidden [N, H]) and ``labels`` [N] (draft ids, -1 = cannot be drafted).

    ``active`` (1-D long, sorted) restricts the work to rows that carry weight; the others get 0 and
    a zero gradient. Only ``logits`` receives a gradient.
    """

    @staticmethod
    def forward(ctx, logits, tgt_logits, labels, active, chunk_rows: int, with_soft_ce: bool, vocab: Vocab):
        n = logits.shape[0]
        ce = torch.zeros(n, dtype=torch.float32, device=logits.device)
        sce = torch.zeros_like(ce)
        l1 = torch.zeros_like(ce)

        def chunk(sel):  # fp32 throughout, like the literal version's elementwise ops
            c, s, l_ = row_stats(_rows(logits, sel), _rows(tgt_logits, sel), labels[sel], vocab, with_soft_ce)
            ce[sel], l1[sel] = c, l_
            if s is not None:
                sce[sel] = s

        _for_each(chunk, _chunks(active, n, chunk_rows), logits.device)
        ctx.lazy_tgt = tgt_logits if isinstance(tgt_logits, HeadLogits) else None
        tgt_saved = tgt_logits if ctx.lazy_tgt is None else torch.empty(0)
        ctx.save_for_backward(logits, tgt_saved, labels, active if active is not None else torch.empty(0))
        ctx.has_active = active is not None
        ctx.chunk_rows = chunk_rows
        ctx.vocab = vocab
        return ce, sce, l1

    @staticmethod
    def backward(ctx, g_ce, g_sce, g_l1):
        logits, tgt_logits, labels, active = ctx.saved_tensors
        if ctx.lazy_tgt is not None:
            tgt_logits = ctx.lazy_tgt
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        active = active if ctx.has_active else None
        n = logits.shape[0]
        g_ce, g_sce, g_l1, use_l1, use_sce = grad_scales(g_ce, g_sce, g_l1, n, logits.device)
        full = active is None or active.numel() == n
        grad = (torch.empty_like if full else torch.zeros_like)(logits)

        def chunk(sel):
            g = row_grad(
                _rows(logits, sel), _rows(tgt_logits, sel), labels[sel], ctx.vocab,
                g_ce[sel], g_sce[sel], g_l1[sel], use_l1, use_sce,
            )  # fmt: skip
            grad[sel] = g.to(grad.dtype)

        _for_each(chunk, _chunks(active, n, ctx.chunk_rows), logits.device)
        return grad, None, None, None, None, None, None


def block_row_stats(
    logits,
    tgt_logits: Logits,
    labels: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    chunk_rows: int = 0,
    with_soft_ce: bool = False,
    draft_ids: Optional[torch.Tensor] = None,
    row_weights: Optional[torch.Tensor] = None,
    argmax: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [..., d], tgt_logits [..., V], labels [...] (target ids) -> (ce, soft_ce, l1), each [...] fp32.

    ``valid`` [...] (optional): rows where it is 0 are skipped (their values and gradients are 0).
    ``tgt_logits`` may be a :class:`HeadLogits` (computed per chunk, never stored whole); ``logits``
    may be the drafter's :class:`~deepspec.models.base.HeadFactors` (``loss.chunked_head``).
    ``draft_ids`` [d]: the target id of each draft id when the drafter has a draft vocabulary.
    ``row_weights`` [3, ...] (optional, constants): the weights of ce, soft_ce and l1 in the loss that
    will be backpropagated, up to one scalar; the chunked head then forms its gradients in the forward
    (deepspec/losses/chunked_head.py). Any other use of the terms stays correct, only slower.
    ``argmax`` (a dict, optional): the chunked head puts each row's draft and target argmax there
    ("draft", "target", [...] long; rows without weight get 0), taken in its pass over the logits.
    """
    from deepspec.losses.chunked_head import factored_row_stats
    from deepspec.models.base import HeadFactors
    from deepspec.models.vocab import target_to_draft_index

    shape = labels.shape
    big_v = tgt_logits.shape[-1]
    t = tgt_logits.reshape_rows() if isinstance(tgt_logits, HeadLogits) else tgt_logits.reshape(-1, big_v)
    y = labels.reshape(-1)
    if draft_ids is not None:
        y = target_to_draft_index(draft_ids, big_v)[y]  # -1: cannot be drafted
    vocab = Vocab(draft_ids, big_v)
    active = None
    if valid is not None:
        mask = valid.reshape(-1) > 0
        if not bool(mask.all()):
            active = torch.nonzero(mask).flatten()
    if isinstance(logits, HeadFactors):
        ce, sce, l1 = factored_row_stats(
            logits, t, y, active, chunk_rows, with_soft_ce, vocab, row_weights, argmax
        )
        if argmax is not None:
            argmax.update({k: v.view(shape) for k, v in argmax.items()})
        return ce.view(shape), sce.view(shape), l1.view(shape)
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    rows = auto_chunk_rows(max(v, big_v), chunk_rows, logits.device)
    if chunk_rows <= 0 and isinstance(t, HeadLogits):
        rows = max(rows, LAZY_MIN_ROWS)  # a chunk's target matmul reads all of lm_head: amortise it
    ce, sce, l1 = BlockRowStats.apply(z, t, y, active, rows, with_soft_ce, vocab)
    return ce.view(shape), sce.view(shape), l1.view(shape)


def reference_row_stats(logits, tgt_logits, labels, with_soft_ce: bool = False, draft_ids=None):
    """The literal version: full-vocabulary fp32 log-softmax and softmax of both, autograd keeps them.

    With a draft vocabulary, q is scattered into the target's whole vocabulary (0 outside it) and
    every term is taken there: CE counts only labels q can give (others: 0, no gradient), L1 is
    Σ_V |q - p|, soft CE is -Σ p·log q over the tokens q can give.
    """
    from deepspec.models.base import HeadFactors

    if isinstance(tgt_logits, HeadLogits):
        tgt_logits = tgt_logits.materialize()
    if isinstance(logits, HeadFactors):
        f = logits
        logits = f.hidden @ f.lm_head.t().to(f.hidden.dtype)
        if f.markov_z is not None:
            logits = logits + f.markov_z @ f.markov_w2.t().to(f.markov_z.dtype)
    logq = torch.log_softmax(logits.float(), dim=-1)
    p = torch.softmax(tgt_logits.float(), dim=-1)
    if draft_ids is None:
        ce = -torch.gather(logq, -1, labels.unsqueeze(-1)).squeeze(-1)
        sce = -(p * logq).sum(-1) if with_soft_ce else torch.zeros_like(ce)
        l1 = (logq.exp() - p).abs().sum(-1)
        return ce, sce, l1
    full = logq.new_full((*logq.shape[:-1], p.shape[-1]), float("-inf")).index_copy(-1, draft_ids, logq)
    lq = torch.gather(full, -1, labels.unsqueeze(-1)).squeeze(-1)
    ce = torch.where(torch.isfinite(lq), -lq, torch.zeros_like(lq))
    inside = torch.isfinite(full)
    sce = (
        -torch.where(inside, p * full, torch.zeros_like(p)).sum(-1) if with_soft_ce else torch.zeros_like(ce)
    )
    l1 = (full.exp() - p).abs().sum(-1)
    return ce, sce, l1
