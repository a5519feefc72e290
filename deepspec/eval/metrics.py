"""Acceptance statistics from speculative-decoding round records (docs/method.md, Evaluation protocol).

A round verified ℓ drafts and accepted a prefix of ``accepted`` of them; τ = accepted + 1 counts
the correction/bonus token. Slots are numbered k = 1..γ. Works on any objects with ``verified``,
``accepted`` (and optionally ``confidence``) attributes, e.g. :class:`~deepspec.eval.spec_decode.RoundRecord`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def tau(rounds: Sequence) -> float:
    """Mean accepted length per round, bonus/correction token included."""
    return sum(r.accepted + 1 for r in rounds) / len(rounds) if rounds else float("nan")


def acceptance_rate(rounds: Sequence) -> float:
    """Accepted drafts / drafts sent to the target."""
    proposed = sum(r.verified for r in rounds)
    return sum(r.accepted for r in rounds) / proposed if proposed else float("nan")


def _num_slots(rounds: Sequence, num_slots: Optional[int]) -> int:
    return num_slots if num_slots is not None else max((r.verified for r in rounds), default=0)


def conditional_acceptance(rounds: Sequence, num_slots: Optional[int] = None) -> List[Optional[float]]:
    """Per slot k: P(slot k accepted | slots 1..k-1 accepted and slot k was verified).

    Acceptance is a prefix, so "1..k-1 accepted" is ``accepted >= k-1``. None where no round qualifies.
    """
    out = []
    for k in range(1, _num_slots(rounds, num_slots) + 1):
        eligible = [r for r in rounds if r.verified >= k and r.accepted >= k - 1]
        out.append(sum(r.accepted >= k for r in eligible) / len(eligible) if eligible else None)
    return out


def survival(rounds: Sequence, num_slots: Optional[int] = None) -> List[Optional[float]]:
    """Per slot k: P(slots 1..k all accepted) among rounds that verified at least k slots.

    With the full block verified every round this is the running product of the conditional
    acceptances, i.e. the observed counterpart of a_k = Π_{i≤k} c_i.
    """
    out = []
    for k in range(1, _num_slots(rounds, num_slots) + 1):
        eligible = [r for r in rounds if r.verified >= k]
        out.append(sum(r.accepted >= k for r in eligible) / len(eligible) if eligible else None)
    return out


def mean_confidence(rounds: Sequence, num_slots: Optional[int] = None) -> Optional[List[Optional[float]]]:
    """Per slot mean raw confidence over rounds that carry one (None without a confidence head)."""
    with_conf = [r.confidence for r in rounds if getattr(r, "confidence", None) is not None]
    if not with_conf:
        return None
    n = num_slots if num_slots is not None else max(len(c) for c in with_conf)
    out = []
    for k in range(n):
        vals = [c[k] for c in with_conf if len(c) > k]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def tokens_per_second(num_tokens: int, seconds: float) -> float:
    return num_tokens / seconds if seconds > 0 else float("nan")


def summarize(rounds: Sequence, num_slots: Optional[int] = None) -> Dict:
    """All round statistics in one JSON-ready dict."""
    n = _num_slots(rounds, num_slots)
    hist = [0] * (n + 1)
    for r in rounds:
        hist[min(r.accepted, n)] += 1
    return {
        "rounds": len(rounds),
        "proposed": sum(r.verified for r in rounds),
        "accepted": sum(r.accepted for r in rounds),
        "tau": tau(rounds),
        "acceptance_rate": acceptance_rate(rounds),
        "conditional_acceptance": conditional_acceptance(rounds, n),
        "survival": survival(rounds, n),
        "accepted_histogram": hist,  # rounds with 0..γ accepted drafts
        "mean_confidence": mean_confidence(rounds, n),
    }
