"""SPS(B): how many target forward steps per second the current device runs at B tokens per step.

A serving step verifies R requests at once, each scoring its anchor plus ℓ_r drafts against its own
KV cache. The profile times exactly that shape: B tokens laid out as ⌈B/(γ+1)⌉ rows of at most γ+1
tokens, each row attending to ``context`` cached tokens, logits over every position (as in
verification). The fastest of a few timed forwards is kept per B, and step time is made
non-decreasing in B by a least-squares monotone fit.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from deepspec.eval.scheduler import SPSCurve
from deepspec.eval.spec_decode import device_clock


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


def monotone_times(times: Sequence[float]) -> List[float]:
    """Least-squares non-decreasing fit (pool adjacent violators): a bigger step is never faster."""
    blocks: List[List[float]] = []  # [sum, count]
    for t in times:
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: List[float] = []
    for s, c in blocks:
        out += [s / c] * c
    return out


@torch.no_grad()
def profile_sps(
    target, token_counts: Sequence[int], block: int, context: int = 64, repeats: int = 3, seed: int = 0
) -> SPSCurve:
    """Time target forwards at each B of ``token_counts``; returns the measured :class:`SPSCurve`.

    ``repeats`` passes go over all sizes in turn (so a burst of load from another process hits one
    sample of several sizes, not every sample of one size) and each size keeps its fastest time:
    on a shared machine the minimum is the closest reading of what the step itself costs.
    """
    from transformers import DynamicCache

    if repeats < 1 or context < 1:
        raise ValueError("profile needs repeats >= 1 and context >= 1")
    dev = target.device
    gen = torch.Generator().manual_seed(seed)
    vocab = target.vocab_size
    sizes = {}
    for b in sorted(set(int(x) for x in token_counts)):
        rows, per_row = _shape(b, block)
        sizes[rows * per_row] = (rows, per_row)
    setups = {}
    for b, (rows, per_row) in sizes.items():
        cache = DynamicCache(config=target.config)
        target(
            torch.randint(0, vocab, (rows, context), generator=gen).to(dev),
            past_key_values=cache,
            use_cache=True,
        )
        cache.activate_past_recording()  # sliding-window layers: each timed pass is cropped off again
        setups[b] = (cache, torch.randint(0, vocab, (rows, per_row), generator=gen).to(dev), per_row)
    best = {b: math.inf for b in sizes}
    for i in range(repeats + 1):  # pass 0 is an untimed warm-up
        for b, (cache, ids, per_row) in setups.items():
            t0 = device_clock(dev)
            target(ids, past_key_values=cache, use_cache=True, with_logits=True)
            t1 = device_clock(dev)
            cache.crop(-per_row)
            if i:
                best[b] = min(best[b], t1 - t0)
    tokens = sorted(best)
    return SPSCurve(tokens, [1.0 / t for t in monotone_times([best[b] for b in tokens])])
