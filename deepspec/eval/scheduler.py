"""Hardware-aware prefix scheduling (docs/method.md, Prefix scheduler): how many drafts each request sends to the target.

R requests, request r with prefix-survival estimates a_{r,1..γ} (calibrated, non-increasing) and a
profiled curve SPS(B) (target forward steps per second at B tokens per step). Verifying ℓ_r drafts
of request r costs ℓ_r + 1 tokens of the step (the anchor is always scored) and is expected to
yield 1 + Σ_{j≤ℓ_r} a_{r,j} tokens. Throughput Θ = (expected tokens) · SPS(B).

* :func:`schedule` is the causal early-stop greedy: visit (r, j) in descending a, add each while Θ
  improves, stop at the first drop. Whether slot j of request r is verified then depends only on
  a_{r,1..j}, i.e. on the drafts x_1..x_{j-1} before it, never on x_j or later drafts: the
  verification rule stays lossless.
* :func:`schedule_global` keeps the best Θ over all prefixes of the visiting order. Whether slot j
  is verified then depends on later confidences, so it must be fed *lagged* survival curves
  (decided from rounds already finished, as the asynchronous production variant does).
* :func:`threshold_lengths` is the static rule ℓ = #{j : a_j ≥ t}.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

SPS = Callable[[int], float]


@dataclass
class SPSCurve:
    """Steps per second measured at some total token counts B, interpolated in between.

    Step *time* is interpolated linearly in B (forward time is close to affine in the token count
    once the device is busy); below the first point time is flat, above the last it grows with the
    slope of the last segment.
    """

    tokens: List[int]
    steps_per_s: List[float]

    def __post_init__(self) -> None:
        if not self.tokens or len(self.tokens) != len(self.steps_per_s):
            raise ValueError("SPSCurve needs as many steps_per_s values as token counts (at least one)")
        if any(b <= a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError(f"SPSCurve token counts must be strictly increasing, got {self.tokens}")
        if not all(s > 0 for s in self.steps_per_s):
            raise ValueError("SPSCurve steps_per_s must be positive")
        self._time = [1.0 / s for s in self.steps_per_s]

    def step_time(self, b: float) -> float:
        xs, ts = self.tokens, self._time
        if b <= xs[0]:
            return ts[0]
        if b >= xs[-1]:
            if len(xs) == 1:
                return ts[0]
            slope = max(0.0, (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]))
            return ts[-1] + slope * (b - xs[-1])
        i = bisect.bisect_right(xs, b)  # xs[i-1] <= b < xs[i]
        return ts[i - 1] + (ts[i] - ts[i - 1]) * (b - xs[i - 1]) / (xs[i] - xs[i - 1])

    def __call__(self, b: float) -> float:
        return 1.0 / self.step_time(b)

    def many(self, b: np.ndarray) -> np.ndarray:
        """SPS at each entry of ``b`` (same rule as :meth:`step_time`, vectorised)."""
        b = np.asarray(b, dtype=np.float64)
        xs, ts = np.asarray(self.tokens, dtype=np.float64), np.asarray(self._time)
        t = np.interp(b, xs, ts)
        if len(xs) > 1:
            slope = max(0.0, (ts[-1] - ts[-2]) / (xs[-1] - xs[-2]))
            t = np.where(b > xs[-1], ts[-1] + slope * (b - xs[-1]), t)
        return 1.0 / t

    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "steps_per_s": list(self.steps_per_s)}

    @classmethod
    def load(cls, path: str) -> SPSCurve:
        try:
            d = json.loads(Path(path).read_text())
            d = d.get("sps_profile", d)  # also accept a whole eval.json
            return cls([int(b) for b in d["tokens"]], [float(s) for s in d["steps_per_s"]])
        except KeyError as e:
            raise ValueError(
                f"{path}: SPS profile needs keys 'tokens' and 'steps_per_s' (missing {e})"
            ) from None


def _monotone(curve: Sequence[float]) -> List[float]:
    """A prefix-survival curve cannot rise: a_j = min_{i≤j} a_i (also clips to [0, 1])."""
    out, m = [], 1.0
    for a in curve:
        m = min(m, max(0.0, float(a)))
        out.append(m)
    return out


def _visit_order(curves: Sequence[Sequence[float]]) -> List[Tuple[float, int, int]]:
    # Descending a; on ties the earlier slot (then the lower request) first, so ℓ_r grows by one.
    items = [(a, r, j) for r, c in enumerate(curves) for j, a in enumerate(c, start=1) if a > 0]
    return sorted(items, key=lambda t: (-t[0], t[2], t[1]))


def schedule(curves: Sequence[Sequence[float]], sps: SPS) -> Tuple[List[int], float]:
    """The causal greedy of docs/method.md, Prefix scheduler: returns (ℓ_r per request, expected throughput Θ in tokens/s)."""
    curves = [_monotone(c) for c in curves]
    r_n = len(curves)
    if r_n == 0:
        return [], 0.0
    ell = [0] * r_n
    b, tau = r_n, float(r_n)
    best = tau * sps(b)
    for a, r, j in _visit_order(curves):
        theta = (tau + a) * sps(b + 1)
        if not theta > best:
            break
        ell[r], b, tau, best = j, b + 1, tau + a, theta
    return ell, best


def schedule_global(curves: Sequence[Sequence[float]], sps: SPS) -> Tuple[List[int], float]:
    """Same visiting order, but the best Θ over *all* its prefixes (not causal: use lagged curves)."""
    curves = [_monotone(c) for c in curves]
    r_n = len(curves)
    if r_n == 0:
        return [], 0.0
    order = _visit_order(curves)
    b, tau = r_n, float(r_n)
    best, best_n = tau * sps(b), 0
    for n, (a, _, _) in enumerate(order, start=1):
        b, tau = b + 1, tau + a
        theta = tau * sps(b)
        if theta > best:
            best, best_n = theta, n
    ell = [0] * r_n
    for _, r, j in order[:best_n]:
        ell[r] = max(ell[r], j)
    return ell, best


def threshold_lengths(curves: Sequence[Sequence[float]], threshold: float) -> List[int]:
    """Static rule: verify the leading drafts whose survival estimate is at least ``threshold``."""
    return threshold_lengths_array(np.asarray(curves, dtype=np.float64), threshold).tolist()


def threshold_lengths_array(curves: np.ndarray, threshold: float) -> np.ndarray:
    if curves.size == 0:
        return np.zeros(len(curves), dtype=np.int64)
    mono = np.minimum.accumulate(np.clip(curves, 0.0, 1.0), axis=-1)
    return ((mono >= threshold) & (mono > 0)).sum(axis=-1)


def schedule_array(curves: np.ndarray, sps: SPS, global_search: bool = False) -> np.ndarray:
    """:func:`schedule` (or :func:`schedule_global`) for curves [R, γ], vectorised; same result."""
    return schedule_many(np.asarray(curves, dtype=np.float64)[None], sps, global_search)[0]


def schedule_many(curves: np.ndarray, sps: SPS, global_search: bool = False) -> np.ndarray:
    """Independent schedules for S steps at once: curves [S, R, γ] -> ℓ [S, R].

    Θ_n after the first n visits is (R + a_(1) + ... + a_(n))·SPS(R + n); the early stop keeps the
    leading run of strict improvements, the global search the first maximum.
    """
    s_n, r_n, gamma = curves.shape
    mono = np.minimum.accumulate(np.clip(curves, 0.0, 1.0), axis=2).reshape(s_n, r_n * gamma)
    r = np.broadcast_to(np.repeat(np.arange(r_n), gamma), mono.shape)
    j = np.broadcast_to(np.tile(np.arange(1, gamma + 1), r_n), mono.shape)
    order = np.lexsort((r, j, -mono), axis=1)  # descending a; ties: earlier slot, then lower request
    a, r, j = (np.take_along_axis(x, order, axis=1) for x in (mono, r, j))
    valid = a > 0  # zeros sort last and are never visited
    tau = np.cumsum(
        np.concatenate([np.full((s_n, 1), float(r_n)), a], axis=1), axis=1
    )  # the loop's additions
    b = r_n + np.arange(tau.shape[1])
    sps_b = sps.many(b) if hasattr(sps, "many") else np.array([sps(int(x)) for x in b])
    theta = tau * sps_b[None, :]
    ok = np.concatenate([np.ones((s_n, 1), dtype=bool), valid], axis=1)
    if global_search:
        n = np.where(ok, theta, -np.inf).argmax(axis=1)
    else:
        up = (theta[:, 1:] > theta[:, :-1]) & valid
        n = np.where(up.all(axis=1), up.shape[1], up.argmin(axis=1))
    taken = np.arange(a.shape[1])[None, :] < n[:, None]
    ell = np.zeros((s_n, r_n), dtype=np.int64)
    rows = np.broadcast_to(np.arange(s_n)[:, None], a.shape)
    np.maximum.at(ell, (rows[taken], r[taken]), j[taken])
    return ell


def expected_tokens(curve: Sequence[float], ell: int) -> float:
    return 1.0 + float(sum(_monotone(curve)[:ell]))


# ---------------------------------------------------------------- inside speculative_generate


def survival_from_draft(draft, sts_temperatures: Optional[Sequence[float]] = None) -> List[float]:
    from deepspec.eval.calibration import survival_estimates

    if getattr(draft, "confidence_logits", None) is None:
        raise ValueError(
            "scheduled verification needs a drafter with a confidence head (enable_confidence_head)"
        )
    z = np.asarray(draft.confidence_logits.detach().cpu().double().numpy())
    return survival_estimates(z[None, :], sts_temperatures)[0].tolist()


def causal_verify_len(
    sps: SPS, sts_temperatures: Optional[Sequence[float]] = None, others: Sequence[Sequence[float]] = ()
) -> Callable:
    """A ``verify_len(round_index, draft)`` for :func:`speculative_generate` that cuts each block with
    :func:`schedule` on the drafter's own (calibrated) confidences for this very block.

    ``others`` are survival curves of other requests sharing the step (fixed here), so a single
    decoded request can be cut as it would be under load.
    """

    def verify_len(round_index: int, draft) -> int:
        curve = survival_from_draft(draft, sts_temperatures)
        return schedule([curve, *others], sps)[0][0]

    return verify_len


def lagged_verify_len(
    sps: SPS,
    sts_temperatures: Optional[Sequence[float]] = None,
    lag: int = 2,
    gamma: Optional[int] = None,
    others: Sequence[Sequence[float]] = (),
) -> Callable:
    """``verify_len`` with :func:`schedule_global` on the curve of the block drafted ``lag`` rounds ago
    (full block until then). The cut never looks at the block it cuts, so it is causal."""
    history: List[List[float]] = []

    def verify_len(round_index: int, draft) -> int:
        history.append(survival_from_draft(draft, sts_temperatures))
        g = gamma if gamma is not None else len(history[-1])
        if len(history) <= lag:
            return g
        return min(g, schedule_global([history[-1 - lag], *others], sps)[0][0])

    return verify_len


def verify_len_for(
    spec, temperature: float, sps: SPS, lag: int = 0, others: Sequence[Sequence[float]] = ()
) -> Callable:
    """The scheduler's ``verify_len`` for a drafter (its :class:`~deepspec.models.config.DrafterSpec`)
    decoding at ``temperature``: the STS fit stored for that temperature (``spec.sts_for``) applied to
    the confidence output of that temperature's acceptance event (the greedy one at T = 0 when the
    drafter has it). ``lag`` = 0: :func:`causal_verify_len`; > 0: :func:`lagged_verify_len`.

    A draft whose confidences predict another event (drafted at another temperature) is refused:
    its survival curve would be calibrated for the wrong event."""
    if not spec.enable_confidence_head:
        raise ValueError(
            "scheduled verification needs a drafter with a confidence head (enable_confidence_head)"
        )
    sts, event = spec.sts_for(temperature), spec.confidence_event(temperature)
    inner = (
        causal_verify_len(sps, sts, others)
        if lag == 0
        else lagged_verify_len(sps, sts, lag, spec.block_size, others)
    )

    def verify_len(round_index: int, draft) -> int:
        got = getattr(draft, "confidence_event", None)
        if got is not None and got != event:
            raise ValueError(
                f"the scheduler was set up for T={temperature:g} ({event} acceptance) but this block's "
                f"confidences predict {got} acceptance: draft at the temperature the scheduler was built for"
            )
        return inner(round_index, draft)

    verify_len.sts_temperatures = sts  # what this cut calibrates with (reports, tests)
    verify_len.confidence_event = event
    return verify_len
