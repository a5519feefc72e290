"""Acceptance statistics of one decoding run, from per-prompt counts, with a confidence interval.

Both sides (deepspec's evaluator and the engine) reduce to the same per-prompt counts: rounds
(drafts verified), accepted draft tokens, and per draft position how many rounds accepted it. The
mean acceptance length is τ = 1 + Σ accepted / Σ rounds; rounds within one prompt are not
independent, so its standard error treats prompts as clusters (the delta method for a ratio of
sums), which needs no resampling and gives the same answer on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

Z95 = 1.959964


@dataclass
class PromptCounts:
    rounds: int
    accepted: int
    per_pos: List[int] = field(default_factory=list)  # rounds that accepted draft position k


def from_rounds(rounds: Sequence, gamma: int) -> PromptCounts:
    """Counts of one prompt from deepspec's RoundRecords (deepspec.eval.spec_decode)."""
    per_pos = [sum(1 for r in rounds if r.accepted > k) for k in range(gamma)]
    return PromptCounts(len(rounds), sum(r.accepted for r in rounds), per_pos)


def tau_and_se(counts: Sequence[PromptCounts]) -> tuple[float, float]:
    rounds = sum(c.rounds for c in counts)
    if rounds == 0:
        return float("nan"), float("nan")
    rho = sum(c.accepted for c in counts) / rounds
    n = len(counts)
    if n < 2:
        return 1.0 + rho, float("nan")
    resid = sum((c.accepted - rho * c.rounds) ** 2 for c in counts)
    return 1.0 + rho, math.sqrt(n / (n - 1) * resid) / rounds


def summary(counts: Sequence[PromptCounts], gamma: int) -> Dict:
    """τ, its standard error and 95 % interval, and per-position acceptance (share of rounds whose
    draft k was accepted, i.e. survival to slot k)."""
    tau, se = tau_and_se(counts)
    rounds = sum(c.rounds for c in counts)
    per_pos = [
        (sum(c.per_pos[k] for c in counts if k < len(c.per_pos)) / rounds) if rounds else None
        for k in range(gamma)
    ]
    half = Z95 * se if math.isfinite(se) else float("nan")
    return {
        "tau": tau,
        "tau_se": se,
        "tau_ci95": [tau - half, tau + half],
        "rounds": rounds,
        "accepted": sum(c.accepted for c in counts),
        "per_position_acceptance": per_pos,
        "prompts": len(counts),
    }


# At T=0 both sides decode the same prompts deterministically, so a difference can only come from
# numerical near-ties (two float implementations disagreeing on an argmax). When every prompt agrees
# exactly the paired interval has zero width; this floor keeps one flipped near-tie from failing it.
PAIRED_FLOOR = 0.02


def paired_margin(engine: Sequence[PromptCounts], reference: Sequence[PromptCounts]) -> float:
    """95 % half-width of τ_engine − τ_reference when both decoded the same prompts deterministically
    (T=0): the per-prompt residuals of the two ratio estimates are differenced before squaring."""
    re, rr = sum(c.rounds for c in engine), sum(c.rounds for c in reference)
    n = len(engine)
    if n < 2 or re == 0 or rr == 0:
        return PAIRED_FLOOR
    rho_e = sum(c.accepted for c in engine) / re
    rho_r = sum(c.accepted for c in reference) / rr
    resid = sum(
        ((e.accepted - rho_e * e.rounds) / re - (r.accepted - rho_r * r.rounds) / rr) ** 2
        for e, r in zip(engine, reference)
    )
    return max(PAIRED_FLOOR, Z95 * math.sqrt(n / (n - 1) * resid))


def independent_margin(engine: Dict, reference: Dict) -> float:
    """95 % half-width of τ_engine − τ_reference for two independent samples (T>0: different random
    draws); a NaN standard error (one prompt) counts as zero."""
    se_r = reference["tau_se"] if math.isfinite(reference["tau_se"]) else 0.0
    se_e = engine["tau_se"] if math.isfinite(engine["tau_se"]) else 0.0
    return Z95 * math.sqrt(se_r**2 + se_e**2)


def acceptance_mismatches(engine: Sequence[PromptCounts], reference: Sequence[PromptCounts]) -> int:
    """Prompts whose rounds or accepted count differ between the two sides. At T=0 both sides decode
    the same tokens with the same drafter, so a correctly served drafter proposes the same drafts in
    every round and each prompt's counts agree exactly; a misread key changes drafts somewhere even
    when τ over a few prompts barely moves (the main job's drafter with its layer ids shifted by one:
    τ 2.440 against 2.422, 5 of 8 prompts with other counts, docs/engine.md)."""
    return sum(e.rounds != r.rounds or e.accepted != r.accepted for e, r in zip(engine, reference))


def allowed_mismatches(n: int) -> int:
    """Prompts allowed to differ at T=0: numerical near-ties (two float implementations disagreeing
    on a draft's argmax) are rare, one per eight prompts is tolerated."""
    return max(1, n // 8)
