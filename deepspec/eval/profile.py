"""SPS(B): how many target forward steps per second the current device runs at B tokens per step.

A serving step verifies R requests at once, each scoring its anchor plus ℓ_r drafts against its own
KV cache. The profile times exactly that shape: B tokens laid out as ⌈B/(γ+1)⌉ rows of at most γ+1
tokens, each row attending to ``context`` cached tokens, logits over every position (as in
verification). The median of a few timed forwards is kept per B.
"""

from __future__ import annotations

import math
import statistics
from typing import List, Sequence

import torch

from deepspec.eval.scheduler import SPSCurve
from deepspec.eval.spec_decode import _now


def default_token_counts(block: int, max_concurrency: int) -> List[int]:
    """1, 2, 4, ... up to the largest step the simulator can ask for, (γ+1)·R_max."""
    top = max(1, block * max_concurrency)
    out, b = [], 1
    while b < top:
        out.append(b)
        b *= 2
    return out + [top]


def _shape(b: int, block: int):
    rows = max(1, math.ceil(b / block))
    return rows, math.ceil(b / rows)


@torch.no_grad()
def profile_sps(target, token_counts: Sequence[int], block: int, context: int = 64, repeats: int = 3,
                seed: int = 0) -> SPSCurve:
    """Time target forwards at each B of ``token_counts``; returns the measured :class:`SPSCurve`."""
    from transformers import DynamicCache

    if repeats < 1 or context < 1:
        raise ValueError("profile needs repeats >= 1 and context >= 1")
    dev = target.device
    gen = torch.Generator().manual_seed(seed)
    vocab = target.vocab_size
    measured = {}
    for b in sorted(set(int(x) for x in token_counts)):
        rows, per_row = _shape(b, block)
        cache = DynamicCache(config=target.config)
        ctx = torch.randint(0, vocab, (rows, context), generator=gen).to(dev)
        target(ctx, past_key_values=cache, use_cache=True)
        ids = torch.randint(0, vocab, (rows, per_row), generator=gen).to(dev)
        times = []
        for i in range(repeats + 1):  # the first forward is an untimed warm-up
            t0 = _now(dev)
            target(ids, past_key_values=cache, use_cache=True, with_logits=True)
            t1 = _now(dev)
            cache.crop(-per_row)
            if i:
                times.append(t1 - t0)
        measured[rows * per_row] = min(measured.get(rows * per_row, math.inf), statistics.median(times))
        del cache
    tokens = sorted(measured)
    # A bigger step is never faster: take the running max of the step time (timer noise on small B).
    step, best = [], 0.0
    for t in tokens:
        best = max(best, measured[t])
        step.append(best)
    return SPSCurve(tokens, [1.0 / s for s in step])
