"""Greedy acceptance of each drafted slot: does the drafter's argmax equal the target's?

At T = 0 a draft survives verification exactly when it is the target's argmax token, a 0/1 event
(docs/method.md, Confidence head); the confidence head's greedy output is trained on it. The argmax
is taken over whatever form the loss receives the logits in (a tensor, the target's lazy
:class:`~deepspec.losses.vocab_terms.HeadLogits`, or the drafter's chunked
:class:`~deepspec.models.base.HeadFactors`), a chunk of rows at a time, so no extra
[positions x vocabulary] tensor is formed. A soft cap (Gemma 4) is increasing, so it never moves an
argmax and is not applied here.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepspec.losses.vocab_terms import HeadLogits

ROW_ELEMENTS = 1 << 22  # logits per chunk (16 MB of fp32)


def _argmax_rows(n: int, vocab: int, logits_of) -> torch.Tensor:
    size = max(1, ROW_ELEMENTS // max(1, vocab))
    return torch.cat([logits_of(slice(s, min(s + size, n))).argmax(-1) for s in range(0, n, size)])


@torch.no_grad()
def row_argmax(x) -> torch.Tensor:
    """argmax over the last (vocabulary) axis of logits ``x`` [..., V] in any of the loss's forms -> [...]."""
    if isinstance(x, torch.Tensor):
        return x.detach().argmax(-1)
    lead = tuple(x.shape[:-1])
    if isinstance(x, HeadLogits):
        h = x.hidden.reshape(-1, x.hidden.shape[-1])
        w = x.weight
        out = _argmax_rows(h.shape[0], w.shape[0], lambda s: torch.matmul(h[s].to(w.dtype), w.t()))
        return out.reshape(lead)
    if hasattr(x, "lm_head") and hasattr(x, "markov_z"):  # HeadFactors: h @ W.T + z @ W2.T
        h = x.hidden.detach().reshape(-1, x.hidden.shape[-1])
        w = x.lm_head.detach()
        z = x.markov_z.detach().reshape(-1, x.markov_z.shape[-1]) if x.markov_z is not None else None
        w2 = x.markov_w2.detach() if x.markov_w2 is not None else None

        def logits_of(s):
            out = torch.matmul(h[s].to(w.dtype), w.t()).float()
            return out if z is None else out + torch.matmul(z[s].to(w2.dtype), w2.t()).float()

        return _argmax_rows(h.shape[0], w.shape[0], logits_of).reshape(lead)
    raise TypeError(f"row_argmax: unsupported logits type {type(x).__name__}")


def greedy_acceptance(
    draft_logits, tgt_logits, draft_ids: Optional[torch.Tensor] = None, known: Optional[dict] = None
) -> torch.Tensor:
    """[B, A, γ] float: 1 where the drafter's argmax token (mapped to a target id through ``draft_ids``
    when it has a draft vocabulary) is the target's argmax, else 0. This is what the greedy rule
    accepts at slot k given the teacher-forced slots before it. ``known``: argmaxes the loss already
    took in its pass over the logits ("draft" and "target", [B, A, γ]); the others are computed here."""
    known = known or {}
    d = known["draft"] if "draft" in known else row_argmax(draft_logits)
    if draft_ids is not None:
        d = draft_ids.to(d.device)[d]
    t = known["target"] if "target" in known else row_argmax(tgt_logits)
    return (d == t.to(d.device)).float()
