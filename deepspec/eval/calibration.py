"""Confidence of prefix survival (docs/method.md, Calibration: sequential temperature scaling): ECE / AUC / Brier, and sequential temperature scaling.

Round i drafted γ tokens with raw confidence logits z_{i,1..γ} and had ``accepted_i`` drafts
accepted (a prefix). The prefix-survival estimate at slot k is a_{i,k} = Π_{j≤k} σ(z_{i,j}/T_j)
(T = 1 before calibration) and the event it predicts is y_{i,k} = [accepted_i ≥ k], "x_1..x_k all
accepted". Slot k is scored only on rounds that sent at least k drafts to the target.

STS: for k = 1..γ in order, T_k is the grid value that minimises the ECE of a_{·,k} against
y_{·,k}, with T_1..T_{k-1} already fixed; among equal ECEs the one closest to 1 wins. Each σ(z/T)
with T > 0 is increasing in z, so the ranking of every per-slot confidence c_k is unchanged (its
AUC is identical); the ranking of a product of several re-scaled factors can move slightly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

STS_GRID = np.round(np.arange(1, 101) * 0.05, 2)  # 0.05 .. 5.00, step 0.05
_TIE = 1e-12  # ECE differences below this are ties (then T closest to 1 wins)


@dataclass
class ConfidenceData:
    """Rounds as arrays: logits [N, γ], accepted [N], verified [N], prompt index [N]."""

    logits: np.ndarray
    accepted: np.ndarray
    verified: np.ndarray
    prompt: np.ndarray

    @property
    def gamma(self) -> int:
        return self.logits.shape[1]

    def __len__(self) -> int:
        return self.logits.shape[0]

    def subset(self, keep: np.ndarray) -> ConfidenceData:
        return ConfidenceData(self.logits[keep], self.accepted[keep], self.verified[keep], self.prompt[keep])

    def events(self) -> np.ndarray:
        """y [N, γ]: slots 1..k all accepted."""
        return self.accepted[:, None] >= np.arange(1, self.gamma + 1)[None, :]

    def scored(self) -> np.ndarray:
        """[N, γ] whether slot k of round i was verified (and so can be scored)."""
        return self.verified[:, None] >= np.arange(1, self.gamma + 1)[None, :]


def from_rounds(rounds_by_prompt: Sequence[Sequence]) -> Optional[ConfidenceData]:
    """Collect the rounds that carry confidence logits; None if none do (no confidence head)."""
    logits, acc, ver, prompt = [], [], [], []
    for i, rounds in enumerate(rounds_by_prompt):
        for r in rounds:
            if getattr(r, "confidence_logits", None) is None:
                continue
            logits.append(list(r.confidence_logits))
            acc.append(r.accepted)
            ver.append(r.verified)
            prompt.append(i)
    if not logits:
        return None
    return ConfidenceData(
        np.asarray(logits, dtype=np.float64), np.asarray(acc), np.asarray(ver), np.asarray(prompt)
    )


def split_by_prompt(data: ConfidenceData, calibration_fraction: float, seed: int = 0):
    """(calibration, evaluation): disjoint sets of prompts, so correlated rounds stay together."""
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"eval.calibration_fraction={calibration_fraction}: must be in (0, 1)")
    prompts = np.unique(data.prompt)
    if len(prompts) < 2:
        raise ValueError("calibration needs rounds from at least 2 prompts (one to fit STS, one to test it)")
    order = np.random.default_rng(seed).permutation(prompts)
    n_cal = min(max(1, int(round(calibration_fraction * len(prompts)))), len(prompts) - 1)
    cal = np.isin(data.prompt, order[:n_cal])
    return data.subset(cal), data.subset(~cal)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def survival_estimates(logits: np.ndarray, temperatures: Optional[Sequence[float]] = None) -> np.ndarray:
    """a [N, γ] = cumulative product of σ(z_k / T_k) (T = 1 when ``temperatures`` is None)."""
    z = np.asarray(logits, dtype=np.float64)
    if temperatures is not None:
        t = np.asarray(temperatures, dtype=np.float64)
        if t.shape != (z.shape[-1],) or not np.all(t > 0):
            raise ValueError(f"STS temperatures {list(t)} must be {z.shape[-1]} positive numbers")
        z = z / t
    return np.cumprod(_sigmoid(z), axis=-1)


def _bin_index(pred: np.ndarray, bins: int) -> np.ndarray:
    return np.minimum((pred * bins).astype(np.int64), bins - 1)


def ece(pred: np.ndarray, obs: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error, equal-width bins on [0, 1]: Σ_b (n_b/N)·|mean pred_b − mean obs_b|."""
    pred, obs = np.asarray(pred, dtype=np.float64), np.asarray(obs, dtype=np.float64)
    if pred.size == 0:
        return float("nan")
    b = _bin_index(pred, bins)
    gap = np.bincount(b, weights=pred - obs, minlength=bins)  # Σ (pred − obs) per bin
    return float(np.abs(gap).sum() / pred.size)


def _ece_many(preds: np.ndarray, obs: np.ndarray, bins: int) -> np.ndarray:
    """ECE of each row of preds [G, N] against obs [N]."""
    g, n = preds.shape
    b = _bin_index(preds, bins) + bins * np.arange(g)[:, None]
    gap = np.bincount(b.ravel(), weights=(preds - obs[None, :]).ravel(), minlength=g * bins)
    return np.abs(gap.reshape(g, bins)).sum(axis=1) / n


def ece_floor(pred: np.ndarray, bins: int = 15, draws: int = 20, seed: int = 0) -> float:
    """The ECE a *perfectly* calibrated head would show on this many rounds: outcomes drawn from the
    predictions themselves. ECE is biased upward by sampling noise; compare against this, not 0."""
    pred = np.asarray(pred, dtype=np.float64)
    if pred.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    return float(np.mean([ece(pred, rng.random(pred.size) < pred, bins) for _ in range(draws)]))


def auc(pred: np.ndarray, obs: np.ndarray) -> float:
    """ROC AUC (Mann–Whitney, ties count one half); NaN when only one class is present."""
    pred, obs = np.asarray(pred, dtype=np.float64), np.asarray(obs, dtype=bool)
    n_pos, n_neg = int(obs.sum()), int((~obs).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(pred, kind="mergesort")
    sorted_pred = pred[order]
    ranks = np.empty(pred.size, dtype=np.float64)
    # average rank over each run of equal predictions
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_pred)) + 1]
    ends = np.r_[starts[1:], pred.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = 0.5 * (s + e - 1) + 1
    return float((ranks[obs].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def brier(pred: np.ndarray, obs: np.ndarray) -> float:
    pred, obs = np.asarray(pred, dtype=np.float64), np.asarray(obs, dtype=np.float64)
    return float(np.mean((pred - obs) ** 2)) if pred.size else float("nan")


def reliability(pred: np.ndarray, obs: np.ndarray, bins: int = 15) -> List[Dict]:
    """Per non-empty bin: its range, count, mean prediction and observed frequency."""
    pred, obs = np.asarray(pred, dtype=np.float64), np.asarray(obs, dtype=np.float64)
    b = _bin_index(pred, bins)
    out = []
    for i in range(bins):
        m = b == i
        if m.any():
            out.append(
                {
                    "lo": i / bins,
                    "hi": (i + 1) / bins,
                    "count": int(m.sum()),
                    "mean_pred": float(pred[m].mean()),
                    "frequency": float(obs[m].mean()),
                }
            )
    return out


def fit_sts(data: ConfidenceData, bins: int = 15, grid: Sequence[float] = STS_GRID) -> List[float]:
    """Sequential temperature scaling: T_1..T_γ, each chosen with the earlier ones fixed."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.size == 0 or not np.all(grid > 0):
        raise ValueError("STS grid must be non-empty and positive")
    y, scored = data.events(), data.scored()
    temps: List[float] = []
    prefix = np.ones(len(data))  # Π_{j<k} σ(z_j / T_j) with the temperatures fixed so far
    # Candidates in order of preference on ties: closest to 1 first (then the smaller).
    pref = np.lexsort((grid, np.abs(grid - 1.0)))
    for k in range(data.gamma):
        m = scored[:, k]
        z = data.logits[m, k]
        if m.sum() == 0 or np.all(y[m, k]) or not np.any(y[m, k]):
            t = 1.0  # nothing to learn from (no rounds, or one class only): leave the slot alone
        else:
            preds = prefix[m][None, :] * _sigmoid(z[None, :] / grid[:, None])  # [G, N_k]
            e = _ece_many(preds, y[m, k].astype(np.float64), bins)[pref]
            t = float(grid[pref][np.flatnonzero(e <= e.min() + _TIE)[0]])
        temps.append(t)
        prefix = prefix * _sigmoid(data.logits[:, k] / t)
    return temps


def slot_metrics(data: ConfidenceData, temperatures: Optional[Sequence[float]], bins: int = 15) -> List[Dict]:
    """Per slot: ECE, AUC, Brier of a_k against y_k, and the AUC of c_k on its conditional event."""
    a = survival_estimates(data.logits, temperatures)
    c = _sigmoid(data.logits / (np.asarray(temperatures) if temperatures is not None else 1.0))
    y, scored = data.events(), data.scored()
    out = []
    for k in range(data.gamma):
        m = scored[:, k]
        reached = m & (data.accepted >= k)  # slots 1..k-1 accepted: where c_k is a prediction
        out.append(
            {
                "slot": k + 1,
                "rounds": int(m.sum()),
                "observed": float(y[m, k].mean()) if m.any() else float("nan"),
                "mean_estimate": float(a[m, k].mean()) if m.any() else float("nan"),
                "ece": ece(a[m, k], y[m, k], bins),
                "ece_floor": ece_floor(a[m, k], bins, seed=k),
                "auc": auc(a[m, k], y[m, k]),
                "brier": brier(a[m, k], y[m, k]),
                "conditional_auc": auc(c[reached, k], y[reached, k]),
            }
        )
    return out


def _mean(rows: List[Dict], key: str) -> float:
    vals = [r[key] for r in rows if r[key] == r[key]]  # drop NaN
    return float(np.mean(vals)) if vals else float("nan")


def calibration_report(
    data: ConfidenceData, calibration_fraction: float = 0.5, bins: int = 15, seed: int = 0
) -> Dict:
    """Fit STS on one split of prompts, score before/after on the other; JSON-ready."""
    cal, test = split_by_prompt(data, calibration_fraction, seed)
    temps = fit_sts(cal, bins)
    before, after = slot_metrics(test, None, bins), slot_metrics(test, temps, bins)
    a_before, a_after = survival_estimates(test.logits), survival_estimates(test.logits, temps)
    y, scored = test.events(), test.scored()
    return {
        "sts_temperatures": temps,
        "calibration_rounds": len(cal),
        "evaluation_rounds": len(test),
        "calibration_prompts": int(len(np.unique(cal.prompt))),
        "evaluation_prompts": int(len(np.unique(test.prompt))),
        "bins": bins,
        "before": before,
        "after": after,
        "mean_ece_before": _mean(before, "ece"),
        "mean_ece_after": _mean(after, "ece"),
        "mean_ece_floor_after": _mean(after, "ece_floor"),
        "mean_auc_before": _mean(before, "auc"),
        "mean_auc_after": _mean(after, "auc"),
        "mean_brier_before": _mean(before, "brier"),
        "mean_brier_after": _mean(after, "brier"),
        "reliability_before": [
            reliability(a_before[scored[:, k], k], y[scored[:, k], k], bins) for k in range(test.gamma)
        ],
        "reliability_after": [
            reliability(a_after[scored[:, k], k], y[scored[:, k], k], bins) for k in range(test.gamma)
        ],
    }
