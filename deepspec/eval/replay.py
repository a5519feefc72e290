"""Replay recorded rounds under other verification rules: the threshold sweep and the R-request simulator.

A recorded round drafted γ tokens, sent all of them to the target (SPEC §6: full block) and had
``accepted`` of them accepted. Had it sent only ℓ drafts, the lossless rule would have accepted
the same events on slots 1..ℓ, so it would have committed min(ℓ, accepted) + 1 tokens. Each round
also carries its calibrated survival curve a_{1..γ}, which is all a causal rule may look at.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from deepspec.eval.scheduler import SPS, schedule, schedule_global, threshold_lengths

POLICIES = ("fixed", "fixed_best", "threshold", "scheduled", "scheduled_lagged_global")


def threshold_sweep(curves: np.ndarray, accepted: np.ndarray, thresholds: Sequence[float]) -> List[Dict]:
    """Per threshold t on a_k (verify slots while a_k ≥ t): what one request would have done.

    tokens_per_step: committed tokens per target step (τ with the cut; t = 0 gives the plain τ);
    acceptance_rate: accepted / verified drafts; wasted_per_step: verified drafts that were not
    committed (rejected, or after a rejection); expected_tokens_per_step: what the curves predicted.
    """
    curves, accepted = np.asarray(curves, dtype=np.float64), np.asarray(accepted)
    out = []
    for t in thresholds:
        ell = np.asarray(threshold_lengths(curves, float(t)))
        got = np.minimum(ell, accepted)
        cum = np.concatenate([np.zeros((len(curves), 1)), np.cumsum(np.minimum.accumulate(curves, axis=1), axis=1)], axis=1)
        verified = int(ell.sum())
        out.append({
            "threshold": float(t),
            "mean_verify_len": float(ell.mean()),
            "tokens_per_step": float((got + 1).mean()),
            "expected_tokens_per_step": float((1 + cum[np.arange(len(ell)), ell]).mean()),
            "acceptance_rate": float(got.sum() / verified) if verified else float("nan"),
            "wasted_per_step": float((ell - got).mean()),
        })
    return out


def _lengths(policy: str, curves: List[List[float]], lagged: List[List[float]], gamma: int, sps: SPS,
             threshold: Optional[float], fixed_len: int) -> List[int]:
    if policy == "fixed":
        return [gamma] * len(curves)
    if policy == "fixed_best":
        return [fixed_len] * len(curves)
    if policy == "threshold":
        return threshold_lengths(curves, threshold)
    if policy == "scheduled":
        return schedule(curves, sps)[0]
    if policy == "scheduled_lagged_global":
        return schedule_global(lagged, sps)[0]
    raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")


def simulate(curves: np.ndarray, accepted: np.ndarray, sps: SPS, concurrency: int, policy: str,
             threshold: Optional[float] = None, fixed_len: Optional[int] = None, lag: int = 2) -> Dict:
    """R = ``concurrency`` requests decode together; each step verifies Σ_r (ℓ_r + 1) tokens.

    Request r replays a contiguous stretch of the recorded rounds (rounds r·S .. r·S+S−1, wrapping,
    with S = ⌈N/R⌉ steps), so all R·S round visits cover the recording about once. A step takes
    1/SPS(B) seconds (target forward only; drafting is not charged). Expected tokens use the
    curves (1 + Σ_{j≤ℓ} a_j); realised ones the recorded outcomes (min(ℓ, accepted) + 1).
    ``scheduled_lagged_global`` decides from the curves of ``lag`` steps earlier of each request.
    """
    curves, accepted = np.asarray(curves, dtype=np.float64), np.asarray(accepted)
    n, gamma = curves.shape
    r_n = int(concurrency)
    if n == 0 or r_n < 1:
        raise ValueError("simulate needs recorded rounds and concurrency >= 1")
    if policy == "threshold" and threshold is None:
        raise ValueError("policy 'threshold' needs a threshold")
    steps = math.ceil(n / r_n)
    mono = np.minimum.accumulate(np.clip(curves, 0, 1), axis=1)
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(mono, axis=1)], axis=1)
    exp_tok = real_tok = time_s = b_sum = ell_sum = 0.0
    for s in range(steps):
        idx = [(r * steps + s) % n for r in range(r_n)]
        lag_idx = [(r * steps + s - lag) % n for r in range(r_n)]
        cur = [mono[i].tolist() for i in idx]
        lagged = [mono[i].tolist() for i in lag_idx] if policy == "scheduled_lagged_global" else cur
        ell = _lengths(policy, cur, lagged, gamma, sps, threshold, gamma if fixed_len is None else fixed_len)
        b = sum(ell) + r_n
        time_s += 1.0 / sps(b)
        b_sum += b
        ell_sum += sum(ell)
        exp_tok += sum(1 + cum[i, l] for i, l in zip(idx, ell))
        real_tok += sum(min(l, int(accepted[i])) + 1 for i, l in zip(idx, ell))
    return {
        "policy": policy,
        "concurrency": r_n,
        "steps": steps,
        "expected_tokens_per_s": exp_tok / time_s,
        "realised_tokens_per_s": real_tok / time_s,
        "per_request_tokens_per_s": real_tok / time_s / r_n,
        "tokens_per_request_step": real_tok / (steps * r_n),
        "mean_batch_tokens": b_sum / steps,
        "mean_verify_len": ell_sum / (steps * r_n),
    }


def best_fixed_length(curves: np.ndarray, accepted: np.ndarray, sps: SPS, concurrency: int) -> int:
    """The constant ℓ with the highest *expected* throughput (chosen from the curves, not outcomes)."""
    gamma = np.asarray(curves).shape[1]
    res = [simulate(curves, accepted, sps, concurrency, "fixed_best", fixed_len=l) for l in range(gamma + 1)]
    return int(np.argmax([r["expected_tokens_per_s"] for r in res]))


def best_threshold(curves: np.ndarray, accepted: np.ndarray, sps: SPS, thresholds: Sequence[float]) -> float:
    """The static threshold with the highest expected single-request throughput (SPEC §5: R = 1)."""
    res = [simulate(curves, accepted, sps, 1, "threshold", threshold=t)["expected_tokens_per_s"] for t in thresholds]
    return float(thresholds[int(np.argmax(res))])


def concurrency_sweep(curves: np.ndarray, accepted: np.ndarray, sps: SPS, levels: Sequence[int],
                      thresholds: Sequence[float], lag: int = 2) -> Dict:
    """Every policy at every concurrency level, plus scheduled-vs-fixed ratios."""
    t_star = best_threshold(curves, accepted, sps, thresholds)
    rows = []
    for r in levels:
        l_star = best_fixed_length(curves, accepted, sps, r)
        res = {p: simulate(curves, accepted, sps, r, p, threshold=t_star, fixed_len=l_star, lag=lag) for p in POLICIES}
        res["fixed_best"]["fixed_len"] = l_star
        fixed, sched = res["fixed"]["realised_tokens_per_s"], res["scheduled"]["realised_tokens_per_s"]
        rows.append({"concurrency": r, "policies": res, "scheduled_over_fixed": sched / fixed,
                     "scheduled_over_threshold": sched / res["threshold"]["realised_tokens_per_s"],
                     "scheduled_over_fixed_best": sched / res["fixed_best"]["realised_tokens_per_s"]})
    return {"static_threshold": t_star, "levels": rows}
