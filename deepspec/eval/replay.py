"""Replay recorded rounds under other verification rules: the threshold sweep and the R-request simulator.

A recorded round drafted γ tokens, sent all of them to the target (docs/method.md, Evaluation protocol: full block) and had
``accepted`` of them accepted. Had it sent only ℓ drafts, the lossless rule would have accepted
the same events on slots 1..ℓ, so it would have committed min(ℓ, accepted) + 1 tokens. Each round
also carries its calibrated survival curve a_{1..γ}, which is all a causal rule may look at.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from deepspec.eval.scheduler import SPS, schedule_many, threshold_lengths_array

POLICIES = ("fixed", "fixed_best", "threshold", "scheduled", "scheduled_lagged_global")


def threshold_sweep(curves: np.ndarray, accepted: np.ndarray, thresholds: Sequence[float]) -> List[Dict]:
    """Per threshold t on a_k (verify slots while a_k ≥ t): what one request would have done.

    tokens_per_step: committed tokens per target step (τ with the cut; t = 0 gives the plain τ);
    acceptance_rate: accepted / verified drafts; wasted_per_step: verified drafts that were not
    committed (rejected, or after a rejection); expected_tokens_per_step: what the curves predicted.
    """
    curves, accepted = np.asarray(curves, dtype=np.float64), np.asarray(accepted)
    cum = np.concatenate(
        [np.zeros((len(curves), 1)), np.cumsum(np.minimum.accumulate(curves, axis=1), axis=1)], axis=1
    )
    out = []
    for t in thresholds:
        ell = threshold_lengths_array(curves, float(t))
        got = np.minimum(ell, accepted)
        verified = int(ell.sum())
        out.append(
            {
                "threshold": float(t),
                "mean_verify_len": float(ell.mean()),
                "tokens_per_step": float((got + 1).mean()),
                "expected_tokens_per_step": float((1 + cum[np.arange(len(ell)), ell]).mean()),
                "acceptance_rate": float(got.sum() / verified) if verified else float("nan"),
                "wasted_per_step": float((ell - got).mean()),
            }
        )
    return out


def simulate(
    curves: np.ndarray,
    accepted: np.ndarray,
    sps: SPS,
    concurrency: int,
    policy: str,
    threshold: Optional[float] = None,
    fixed_len: Optional[int] = None,
    lag: int = 2,
    prompt: Optional[np.ndarray] = None,
) -> Dict:
    """R = ``concurrency`` requests decode together; each step verifies Σ_r (ℓ_r + 1) tokens.

    Request r replays a contiguous stretch of the recorded rounds (rounds r·S .. r·S+S−1, wrapping,
    with S = ⌈N/R⌉ steps), so all R·S round visits cover the recording about once. A step takes
    1/SPS(B) seconds (target forward only; drafting is not charged). Expected tokens use the
    curves (1 + Σ_{j≤ℓ} a_j); realised ones the recorded outcomes (min(ℓ, accepted) + 1).
    ``scheduled_lagged_global`` decides from the curves of ``lag`` steps earlier of each request.

    ``prompt`` [N] (the prompt index of each round) adds ``per_prompt``: each prompt's realised
    tokens and its share of the simulated time (a step's time split over its requests in proportion
    to the tokens each put into it), so the throughput is Σ tokens / Σ time over prompts and can be
    bootstrapped over them (:func:`gain_interval`).
    """
    curves, accepted = np.asarray(curves, dtype=np.float64), np.asarray(accepted)
    n, gamma = curves.shape
    r_n = int(concurrency)
    if n == 0 or r_n < 1:
        raise ValueError("simulate needs recorded rounds and concurrency >= 1")
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    if policy == "threshold" and threshold is None:
        raise ValueError("policy 'threshold' needs a threshold")
    steps = math.ceil(n / r_n)
    mono = np.minimum.accumulate(np.clip(curves, 0, 1), axis=1)
    cum = np.concatenate([np.zeros((n, 1)), np.cumsum(mono, axis=1)], axis=1)
    s_idx, r_idx = np.meshgrid(np.arange(steps), np.arange(r_n), indexing="ij")
    idx = (r_idx * steps + s_idx) % n  # [S, R] round replayed by request r at step s
    if policy == "fixed":
        ell = np.full(idx.shape, gamma)
    elif policy == "fixed_best":
        ell = np.full(idx.shape, gamma if fixed_len is None else int(fixed_len))
    elif policy == "threshold":
        ell = threshold_lengths_array(mono, float(threshold))[idx]
    else:
        src = idx if policy == "scheduled" else (r_idx * steps + s_idx - lag) % n
        glob = policy == "scheduled_lagged_global"
        ell = schedule_many(mono[src], sps, glob)
    b = (ell + 1).sum(axis=1)
    step_time = 1.0 / (sps.many(b) if hasattr(sps, "many") else np.array([sps(int(x)) for x in b]))
    time_s = float(step_time.sum())
    exp_tok = float((1 + cum[idx, ell]).sum())
    committed = np.minimum(ell, accepted[idx]) + 1
    real_tok = float(committed.sum())
    extra = {}
    if prompt is not None:
        prompts, which = np.unique(np.asarray(prompt)[idx.ravel()], return_inverse=True)
        share = (step_time[:, None] * (ell + 1) / b[:, None]).ravel()
        extra["per_prompt"] = {
            "prompt": prompts.tolist(),
            "tokens": np.bincount(which, weights=committed.ravel().astype(np.float64)).tolist(),
            "time_s": np.bincount(which, weights=share).tolist(),
        }
    return {
        "policy": policy,
        "concurrency": r_n,
        "steps": steps,
        "expected_tokens_per_s": exp_tok / time_s,
        "realised_tokens_per_s": real_tok / time_s,
        "per_request_tokens_per_s": real_tok / time_s / r_n,
        "tokens_per_request_step": real_tok / (steps * r_n),
        "mean_batch_tokens": float(b.mean()),
        "mean_verify_len": float(ell.mean()),
        **extra,
    }


def gain_interval(num: Dict, den: Dict, seed: int = 0):
    """95 % interval of the realised-throughput ratio of two :func:`simulate` results over the same
    rounds (their ``per_prompt``), by bootstrap over prompts, paired (one draw picks the same
    prompts for both policies; :mod:`deepspec.eval.intervals`)."""
    from deepspec.eval import intervals

    a, b = num["per_prompt"], den["per_prompt"]
    if a["prompt"] != b["prompt"]:
        raise ValueError("gain_interval: the two simulations replayed different prompts")
    rows = np.stack([a["tokens"], a["time_s"], b["tokens"], b["time_s"]], axis=1)

    def ratio(t: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (t[..., 0] / t[..., 1]) / (t[..., 2] / t[..., 3])

    return intervals.bootstrap([rows], ratio, seed=seed)


def best_fixed_length(curves: np.ndarray, accepted: np.ndarray, sps: SPS, concurrency: int) -> int:
    """The constant ℓ with the highest *expected* throughput (chosen from the curves, not outcomes)."""
    gamma = np.asarray(curves).shape[1]
    res = [simulate(curves, accepted, sps, concurrency, "fixed_best", fixed_len=n) for n in range(gamma + 1)]
    return int(np.argmax([r["expected_tokens_per_s"] for r in res]))


def best_threshold(curves: np.ndarray, accepted: np.ndarray, sps: SPS, thresholds: Sequence[float]) -> float:
    """The static threshold with the highest expected single-request throughput (docs/method.md, Prefix scheduler: R = 1)."""
    res = [
        simulate(curves, accepted, sps, 1, "threshold", threshold=t)["expected_tokens_per_s"]
        for t in thresholds
    ]
    return float(thresholds[int(np.argmax(res))])


def concurrency_sweep(
    curves: np.ndarray,
    accepted: np.ndarray,
    sps: SPS,
    levels: Sequence[int],
    thresholds: Sequence[float],
    lag: int = 2,
    prompt: Optional[np.ndarray] = None,
) -> Dict:
    """Every policy at every concurrency level, plus scheduled-vs-fixed ratios. With ``prompt`` (each
    round's prompt index) each ratio also gets a 95 % interval over prompts (``*_interval``)."""
    t_star = best_threshold(curves, accepted, sps, thresholds)
    rows = []
    for r in levels:
        l_star = best_fixed_length(curves, accepted, sps, r)
        res = {
            p: simulate(
                curves, accepted, sps, r, p, threshold=t_star, fixed_len=l_star, lag=lag, prompt=prompt
            )
            for p in POLICIES
        }
        res["fixed_best"]["fixed_len"] = l_star
        fixed, sched = res["fixed"]["realised_tokens_per_s"], res["scheduled"]["realised_tokens_per_s"]
        row = {
            "concurrency": r,
            "policies": res,
            "scheduled_over_fixed": sched / fixed,
            "scheduled_over_threshold": sched / res["threshold"]["realised_tokens_per_s"],
            "scheduled_over_fixed_best": sched / res["fixed_best"]["realised_tokens_per_s"],
        }
        if prompt is not None:
            for other in ("fixed_best", "fixed"):
                row[f"scheduled_over_{other}_interval"] = gain_interval(
                    res["scheduled"], res[other]
                ).to_dict()
            for p in res.values():
                p.pop("per_prompt")  # bulky; the intervals carry what it was for
        rows.append(row)
    return {"static_threshold": t_star, "levels": rows}
