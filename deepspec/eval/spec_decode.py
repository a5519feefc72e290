"""Chain speculative decoding of one prompt or a batch of prompts with any drafter (DSpark, DFlash,
EAGLE-3), and the plain-target baseline.

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

:func:`generate` runs B prompts at once: one drafter call and one target forward per round for all
rows, each row with its own acceptance, cache crop (:mod:`deepspec.eval.target_batch`) and stop.
The drafter keeps its context in a :class:`~deepspec.models.draft_cache.DraftCache`, extended with
each round's committed positions instead of being projected again every round.
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


@dataclass
class _Row:
    """One prompt's decoding state inside :func:`generate`."""

    index: int
    generator: Optional[torch.Generator]
    verify_len: Optional[Callable[..., int]]
    tokens: List[int]
    anchor: int  # the last committed token, at position = committed length
    rounds: List[RoundRecord] = field(default_factory=list)
    prefill_time: float = 0.0
    decode_time: float = 0.0
    stopped: bool = False
    feats: Optional[torch.Tensor] = None  # [1, n, F] the whole context (uncached drafting only)
    context: Optional[torch.Tensor] = None  # [1, n] committed ids before the anchor (uncached only)


def _pad_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[1, n_i, ...] tensors -> [R, max n_i, ...], zero padded."""
    longest = max(p.shape[1] for p in parts)
    return torch.cat([torch.cat([p, p.new_zeros(1, longest - p.shape[1], *p.shape[2:])], 1) for p in parts])


@torch.no_grad()
def generate(
    target,
    drafter,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_ids: Iterable[int] = (),
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    draft_cache: bool = True,
    verify_lens: Optional[Sequence[Optional[Callable[..., int]]]] = None,
) -> List[GenerationResult]:
    """Decode ``prompts`` together (chain drafting): one drafter call and one target forward per round
    for all rows still running, each row with its own acceptance, cache crop and stop.

    ``drafter=None`` is plain target decoding (the baseline): one token per row per step.
    ``generators[i]`` is prompt i's random stream; a row's draws come in the same order whatever
    else shares the batch, so a prompt's tokens do not depend on the batch (up to floating-point
    rounding of batched kernels, which can only matter at exact ties). ``draft_cache=False`` drafts
    each row from its whole context again (:meth:`~deepspec.models.base.Drafter.draft`, the reference
    the cache must reproduce; the only path for drafters without :meth:`draft_cached`).
    ``verify_lens[i](round_index, draft)`` is prompt i's scheduler cut (see :func:`speculative_generate`).

    Timing: a row's prefill is its own; a round's wall time is shared equally by the rows in it, so
    summing ``total_time`` over the rows gives the batch's wall time.
    """
    from deepspec.eval.target_batch import TargetBatch, prefill

    _check_temperature(temperature)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts:
        return []
    gens = list(generators) if generators is not None else [None] * len(prompts)
    cuts = list(verify_lens) if verify_lens is not None else [None] * len(prompts)
    if len(gens) != len(prompts) or len(cuts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts need as many generators and verify_lens")
    stops = set(int(s) for s in stop_ids)
    dev = target.device
    gamma = drafter.config.block_size if drafter is not None else 0
    cached = drafter is not None and draft_cache
    wants_ids = bool(getattr(drafter, "uses_context_ids", False))
    feat_dtype = drafter.fc.weight.dtype if hasattr(drafter, "fc") else None

    rows, caches, feats = [], [], []
    for i, prompt in enumerate(prompts):
        t0 = device_clock(dev)
        cache, f, logits = prefill(target, prompt)
        first = _sample(distribution(logits, temperature), temperature, gens[i])
        row = _Row(i, gens[i], _two_arg(cuts[i]), [first], first, stopped=first in stops)
        if drafter is not None and not cached:
            row.feats = f.to(feat_dtype) if feat_dtype is not None else f
            row.context = torch.tensor([list(prompt)], dtype=torch.long, device=dev)
        row.prefill_time = device_clock(dev) - t0
        rows.append(row)
        caches.append(cache)
        feats.append(f)
    lengths = [len(p) for p in prompts]
    batch = TargetBatch(caches, lengths)
    dcache = None
    if cached:
        from deepspec.models.draft_cache import DraftCache

        ids = [torch.tensor([list(p)], dtype=torch.long, device=dev) for p in prompts]
        dcache = DraftCache(len(prompts), dev)
        drafter.extend_cache(dcache, _pad_rows(feats), _pad_rows(ids), batch.lengths)
    del feats, caches

    live = [r for r in rows if not r.stopped and len(r.tokens) < max_new_tokens]
    if len(live) < len(rows):
        keep = torch.tensor([r.index for r in live], dtype=torch.long, device=dev)
        batch.select(keep)
        if dcache is not None:
            dcache.select(keep)
    while live:
        t_a = device_clock(dev)
        anchors = torch.tensor([r.anchor for r in live], device=dev)
        if drafter is None:
            drafts = [None] * len(live)
        elif cached:
            d = drafter.draft_cached(dcache, anchors, temperature, [r.generator for r in live])
            drafts = [d.row(j) for j in range(len(live))]
        else:
            drafts = [
                drafter.draft(
                    r.feats,
                    r.anchor,
                    temperature,
                    r.generator,
                    **({"context_ids": r.context} if wants_ids else {}),
                )
                for r in live
            ]
        t_b = device_clock(dev)
        ells = []
        for r, d in zip(live, drafts):
            ell = gamma if r.verify_len is None or d is None else int(r.verify_len(len(r.rounds), d))
            if not 0 <= ell <= gamma:
                raise ValueError(f"verify_len returned {ell}; must be in [0, block_size={gamma}]")
            ells.append(ell)
        width = max(ells) + 1
        block = anchors[:, None].repeat(1, width)  # padding repeats the anchor; the mask hides it
        for j, (d, ell) in enumerate(zip(drafts, ells)):
            if ell:
                block[j, 1 : ell + 1] = d.tokens[:ell].to(dev)
        lens = torch.tensor(ells, device=dev) + 1
        out = batch.step(target, block, lens)
        p = distribution(out.logits, temperature)  # [R, width, V]
        results = []
        for j, (r, d, ell) in enumerate(zip(live, drafts, ells)):
            q = d.probs[:ell].to(p.device) if d is not None else p.new_zeros(0, p.shape[-1])
            results.append(verify(block[j, 1 : ell + 1], q, p[j, : ell + 1], temperature, r.generator))
        keep = torch.tensor([a + 1 for a, _, _ in results], device=dev)
        t_c = device_clock(dev)

        share = 1.0 / len(live)
        for j, (r, d, ell, (accepted, nxt, mask)) in enumerate(zip(live, drafts, ells, results)):
            committed, r.stopped = _finish(
                r.tokens, block[j, 1 : accepted + 1].tolist() + [nxt], max_new_tokens, stops
            )
            r.anchor = nxt
            if d is not None:
                conf = d.confidence.tolist() if d.confidence is not None else None
                conf_logits = d.confidence_logits.tolist() if d.confidence_logits is not None else None
                r.rounds.append(
                    RoundRecord(
                        gamma,
                        ell,
                        accepted,
                        mask,
                        committed,
                        conf,
                        conf_logits,
                        (t_b - t_a) * share,
                        (t_c - t_b) * share,
                    )
                )
            if r.feats is not None:
                # Keep the drafter's context in step with the target's cache: both cover x0..x_accepted.
                r.feats = torch.cat([r.feats, out.aux[j : j + 1, : accepted + 1].to(r.feats.dtype)], dim=1)
                r.context = torch.cat([r.context, block[j : j + 1, : accepted + 1]], dim=1)
        going = [j for j, r in enumerate(live) if not r.stopped and len(r.tokens) < max_new_tokens]
        index = torch.tensor(going, dtype=torch.long, device=dev)
        batch.commit(keep, index)
        if dcache is not None and going:
            # Finished rows leave first, so no round is spent projecting positions nobody will read.
            if len(going) < len(live):
                dcache.select(index)
            drafter.extend_cache(dcache, out.aux[index], block[index], keep[index])
        t_d = device_clock(dev)
        for r in live:
            r.decode_time += (t_d - t_a) * share
        live = [live[j] for j in going]
    return [GenerationResult(r.tokens, r.rounds, r.prefill_time, r.decode_time, r.stopped) for r in rows]


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
    draft_cache: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` with drafter + target (chain drafting, one prompt).

    ``verify_len(round_index, draft) -> ℓ`` (0 ≤ ℓ ≤ γ; a one-argument ``verify_len(round_index)``
    works too) sends only the first ℓ drafts to the target (a scheduler's cut); default: the full
    block. ℓ = 0 is one plain target step. It is called after drafting and before the target sees
    the block, so it can use the drafter's confidences (:mod:`deepspec.eval.scheduler`); it stays
    lossless as long as whether slot k is verified depends on nothing drawn after x_{k-1}.
    ``draft_cache=False`` re-projects the whole context every round (see :func:`generate`).
    """
    if drafter is None:
        raise ValueError("speculative_generate needs a drafter (target_generate decodes without one)")
    return generate(
        target,
        drafter,
        [prompt_ids],
        max_new_tokens,
        temperature,
        stop_ids,
        [generator],
        draft_cache,
        [verify_len],
    )[0]


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
    return generate(target, None, [prompt_ids], max_new_tokens, temperature, stop_ids, [generator])[0]
