"""Chain speculative decoding (batch 1) with any drafter (DSpark, DFlash, EAGLE-3), and the plain-target
baseline.

One round, with the committed text at positions 0..n and the target's KV cache holding 0..n-1:
the anchor x0 (position n) and the drafter's context (target features of 0..n-1) give drafts
x1..xγ; the target scores [x0, x1..xℓ] in one forward (ℓ ≤ γ, the verified prefix), which gives
p_1..p_{ℓ+1}; :func:`verify` applies the lossless rule (docs/method.md, Speculative decoding); the cache is cropped back to the
committed tokens, their features join the drafter's context, and the correction/bonus token is the
next anchor.

Token accounting: the first new token is sampled from the target's prefill (it is the first
anchor, not part of any round); each round then commits τ = accepted + 1 tokens. So, before
truncation at a stop id or the token budget, ``len(tokens) == 1 + Σ τ``; ``RoundRecord.committed``
is what a round actually added to the output after truncation.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from deepspec.models.base import distribution


@dataclass
class RoundRecord:
    drafted: int  # γ drafts proposed by the drafter
    verified: int  # ℓ ≤ γ drafts sent to the target (the scheduler's prefix; γ by default)
    accepted: int  # accepted drafts (a prefix of the verified ones)
    accept_mask: List[bool] = field(default_factory=list)  # [ℓ] per-slot accept events
    committed: int = 0  # tokens this round added to the output (τ unless truncated at the end)
    confidence: Optional[List[float]] = None  # [γ] raw σ(confidence logit), if the head exists
    confidence_logits: Optional[List[float]] = None  # [γ]
    draft_time: float = 0.0  # seconds
    verify_time: float = 0.0  # seconds (target forward + acceptance rule + cache crop)

    @property
    def tau(self) -> int:
        return self.accepted + 1


@dataclass
class GenerationResult:
    tokens: List[int]  # new tokens only (prompt excluded), truncated at the first stop id / budget
    rounds: List[RoundRecord]  # empty for plain target decoding
    prefill_time: float  # seconds, prompt forward + first token
    decode_time: float  # seconds after the prefill
    stopped: bool  # ended on a stop id (rather than the token budget)

    @property
    def total_time(self) -> float:
        return self.prefill_time + self.decode_time


def _check_temperature(temperature: float) -> None:
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")


def device_clock(device: torch.device) -> float:
    """Wall-clock seconds (time.perf_counter) once the device has run its queued work."""
    # Asynchronous devices must finish queued work before a wall-clock reading means anything.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _sample(probs: torch.Tensor, temperature: float, generator: Optional[torch.Generator]) -> int:
    if temperature == 0:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def verify(
    draft_tokens: torch.Tensor | Sequence[int],
    q_probs: torch.Tensor,
    p_probs: torch.Tensor,
    temperature: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[int, int, List[bool]]:
    """The lossless acceptance rule (docs/method.md, Speculative decoding) for one chain of ℓ drafts.

    draft_tokens [ℓ]; q_probs [ℓ, V] the drafter's distributions they were drawn from;
    p_probs [ℓ+1, V] the target's distributions at the same temperature (p_{ℓ+1} is for the bonus).
    Returns (number accepted, the correction or bonus token, accept events [ℓ] as a prefix mask).
    At T=0 only argmaxes matter: x_k is accepted iff it is argmax p_k, and the next token is the
    argmax at the first mismatch (or of p_{ℓ+1}).
    """
    _check_temperature(temperature)
    tokens = [int(t) for t in draft_tokens]
    ell = len(tokens)
    if p_probs.shape[0] != ell + 1 or q_probs.shape[0] < ell:
        raise ValueError(
            f"verify: {ell} drafts need {ell} draft rows and {ell + 1} target rows; got "
            f"q {tuple(q_probs.shape)}, p {tuple(p_probs.shape)}"
        )
    mask = [False] * ell
    for k, x in enumerate(tokens):
        p, q = p_probs[k], q_probs[k]
        if temperature == 0:
            ok = x == int(p.argmax())
        else:
            # Accept with probability min(1, p(x)/q(x)), written without the division.
            u = torch.rand((), generator=generator, device=p.device)
            ok = bool(u * q[x] < p[x])
        if not ok:
            if temperature == 0:
                return k, int(p.argmax()), mask
            residual = torch.clamp(p.double() - q.double(), min=0)
            # The residual only vanishes when p == q up to rounding, where rejection has
            # probability ~0; fall back to p rather than divide by zero.
            residual = residual if residual.sum() > 0 else p.double()
            return k, _sample(residual / residual.sum(), temperature, generator), mask
        mask[k] = True
    return ell, _sample(p_probs[ell], temperature, generator), mask


def _prefill(target, prompt_ids: Sequence[int]):
    """Run the prompt through the target; returns (cache, features [1, n, F], last-position logits [V]).

    The prompt minus its last token goes in without logits, so a long prompt never materialises
    [n, V] logits; only the last position's are computed.
    """
    from transformers import DynamicCache

    if len(prompt_ids) == 0:
        raise ValueError("prompt is empty; speculative decoding needs at least one prompt token")
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=target.device)
    feats = []
    if ids.shape[1] > 1:
        feats.append(target(ids[:, :-1], past_key_values=cache, use_cache=True).aux)
    out = target(ids[:, -1:], past_key_values=cache, use_cache=True, with_logits=True)
    feats.append(out.aux)
    return cache, torch.cat(feats, dim=1), out.logits[0, -1]


def _finish(tokens: List[int], new: List[int], max_new_tokens: int, stops: set) -> Tuple[int, bool]:
    """Append ``new`` up to the budget and the first stop id; returns (number kept, hit a stop)."""
    kept = 0
    for t in new:
        if len(tokens) >= max_new_tokens:
            break
        tokens.append(t)
        kept += 1
        if t in stops:
            return kept, True
    return kept, False


def _two_arg(fn: Optional[Callable[..., int]]) -> Optional[Callable[..., int]]:
    """Accept both ``f(round_index)`` and ``f(round_index, draft)``."""
    if fn is None:
        return None
    try:
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return fn
    P = inspect.Parameter
    positional = sum(k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for k in kinds)
    if positional >= 2 or P.VAR_POSITIONAL in kinds:
        return fn
    return lambda i, _draft: fn(i)


@torch.no_grad()
def speculative_generate(
    target,
    drafter,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
    verify_len: Optional[Callable[..., int]] = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` with drafter + target (chain drafting, batch 1).

    ``verify_len(round_index, draft) -> ℓ`` (0 ≤ ℓ ≤ γ; a one-argument ``verify_len(round_index)``
    works too) sends only the first ℓ drafts to the target (a scheduler's cut); default: the full
    block. ℓ = 0 is one plain target step. It is called after drafting and before the target sees
    the block, so it can use the drafter's confidences (:mod:`deepspec.eval.scheduler`); it stays
    lossless as long as whether slot k is verified depends on nothing drawn after x_{k-1}.
    """
    verify_len = _two_arg(verify_len)
    _check_temperature(temperature)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    gamma = drafter.config.block_size
    stops = set(int(s) for s in stop_ids)
    dev = target.device
    feat_dtype = drafter.fc.weight.dtype if hasattr(drafter, "fc") else None

    t0 = device_clock(dev)
    cache, feats, logits = _prefill(target, prompt_ids)
    # Sliding-window layers (Gemma 4) keep the states a verify pass appends until the crop below, so a
    # rejected suffix can be taken back; a full-attention cache is unaffected.
    cache.activate_past_recording()
    feats = feats.to(feat_dtype) if feat_dtype is not None else feats
    anchor = _sample(distribution(logits, temperature), temperature, generator)
    tokens = [anchor]
    stopped = anchor in stops
    t_prefill = device_clock(dev)

    # Committed ids before the anchor (positions 0..n-1, what feats covers), for drafters that embed
    # the context tokens and say so (EAGLE-3: uses_context_ids); DSpark reads only the features.
    wants_ids = bool(getattr(drafter, "uses_context_ids", False))
    context = torch.tensor([list(prompt_ids)], dtype=torch.long, device=dev)
    rounds: List[RoundRecord] = []
    while not stopped and len(tokens) < max_new_tokens:
        t_a = device_clock(dev)
        d = drafter.draft(
            feats, anchor, temperature, generator, **({"context_ids": context} if wants_ids else {})
        )
        t_b = device_clock(dev)
        ell = gamma if verify_len is None else int(verify_len(len(rounds), d))
        if not 0 <= ell <= gamma:
            raise ValueError(f"verify_len returned {ell}; must be in [0, block_size={gamma}]")
        drafts = d.tokens[:ell]
        block = torch.cat([torch.tensor([anchor], device=dev), drafts.to(dev)]).unsqueeze(0)
        out = target(block, past_key_values=cache, use_cache=True, with_logits=True)
        p = distribution(out.logits[0], temperature)  # [ℓ+1, V]
        accepted, nxt, mask = verify(drafts, d.probs[:ell].to(p.device), p, temperature, generator)
        # Keep the cache and the drafter's context in step: both now cover x0..x_accepted.
        cache.crop(-(ell - accepted))  # also trims sliding-window layers back to their window
        feats = torch.cat([feats, out.aux[:, : accepted + 1].to(feats.dtype)], dim=1)
        context = torch.cat([context, block[:, : accepted + 1]], dim=1)
        t_c = device_clock(dev)

        committed, stopped = _finish(tokens, drafts[:accepted].tolist() + [nxt], max_new_tokens, stops)
        anchor = nxt
        conf = d.confidence.tolist() if d.confidence is not None else None
        conf_logits = d.confidence_logits.tolist() if d.confidence_logits is not None else None
        rounds.append(
            RoundRecord(gamma, ell, accepted, mask, committed, conf, conf_logits, t_b - t_a, t_c - t_b)
        )
    return GenerationResult(tokens, rounds, t_prefill - t0, device_clock(dev) - t_prefill, stopped)


@torch.no_grad()
def target_generate(
    target,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: Iterable[int] = (),
    generator: Optional[torch.Generator] = None,
) -> GenerationResult:
    """Plain autoregressive decoding with the target's KV cache: the baseline and the reference."""
    _check_temperature(temperature)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    stops = set(int(s) for s in stop_ids)
    dev = target.device
    t0 = device_clock(dev)
    cache, _, logits = _prefill(target, prompt_ids)
    tokens = [_sample(distribution(logits, temperature), temperature, generator)]
    t_prefill = device_clock(dev)
    while tokens[-1] not in stops and len(tokens) < max_new_tokens:
        ids = torch.tensor([[tokens[-1]]], device=dev)
        logits = target(ids, past_key_values=cache, use_cache=True, with_logits=True).logits[0, -1]
        tokens.append(_sample(distribution(logits, temperature), temperature, generator))
    return GenerationResult(tokens, [], t_prefill - t0, device_clock(dev) - t_prefill, tokens[-1] in stops)
