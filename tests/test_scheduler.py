"""Prefix scheduler (docs/method.md), SPS curve, profiler and the R-request replay simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepspec.eval import replay
from deepspec.eval.scheduler import (
    SPSCurve,
    causal_verify_len,
    lagged_verify_len,
    schedule,
    schedule_global,
    threshold_lengths,
)
from deepspec.models.base import Draft


def affine_sps(t0, t1):
    """Steps/s when a step costs t0 + t1·B seconds."""
    return lambda b: 1.0 / (t0 + t1 * b)


def test_schedule_hand_example():
    # Two requests; a step with B tokens takes 10 + B time units.
    curves = [[0.9, 0.5, 0.2], [0.7, 0.3]]
    # start ℓ = [0, 0], B = 2, τ* = 2, Θ = 2/12 = .1667; visit in descending a:
    #   (r0, 1) a=.9: τ*=2.9, B=3, Θ=2.9/13=.2231  keep -> ℓ=[1,0]
    #   (r1, 1) a=.7: τ*=3.6, B=4, Θ=3.6/14=.2571  keep -> ℓ=[1,1]
    #   (r0, 2) a=.5: τ*=4.1, B=5, Θ=4.1/15=.2733  keep -> ℓ=[2,1]
    #   (r1, 2) a=.3: τ*=4.4, B=6, Θ=4.4/16=.2750  keep -> ℓ=[2,2]
    #   (r0, 3) a=.2: τ*=4.6, B=7, Θ=4.6/17=.2706  drop -> stop
    ell, theta = schedule(curves, affine_sps(10, 1))
    assert ell == [2, 2] and theta == pytest.approx(4.4 / 16)
    # Under a load-sensitive device (1 + B) the same confidences buy much shorter blocks:
    #   Θ0 = 2/3; (r0,1): 2.9/4 = .725 keep; (r1,1): 3.6/5 = .72 drop -> stop
    ell, theta = schedule(curves, affine_sps(1, 1))
    assert ell == [1, 0] and theta == pytest.approx(2.9 / 4)
    # A free device verifies everything with a > 0; an empty batch is empty.
    assert schedule(curves, lambda b: 1.0)[0] == [3, 2]
    assert schedule([[0.0, 0.0]], lambda b: 1.0)[0] == [0]
    assert schedule([], lambda b: 1.0) == ([], 0.0)


def test_global_search_differs_from_early_stop():
    # One request; SPS drops at B = 3 then stays flat, so Θ over the visiting order is not unimodal.
    sps = {1: 100, 2: 100, 3: 60, 4: 60, 5: 60}.__getitem__
    a = [[0.9, 0.85, 0.8, 0.75]]
    # greedy: Θ 100 -> 1.9·100 = 190 keep -> 2.75·60 = 165 drop, stop: ℓ = 1
    assert schedule(a, sps) == ([1], pytest.approx(190))
    # global: ... 3.55·60 = 213, 4.3·60 = 258: best is the whole block
    assert schedule_global(a, sps) == ([4], pytest.approx(258))


def test_early_stop_is_causal_global_is_not():
    """Whether slot j of request r is verified must not depend on a_{r,j+1..} (drafts after x_{j-1})."""
    rng = np.random.default_rng(0)
    sps = SPSCurve([1, 8, 64, 512], [100.0, 90.0, 40.0, 6.0])
    for _ in range(300):
        r_n, gamma = int(rng.integers(1, 6)), 5
        curves = [np.cumprod(rng.uniform(0.3, 1.0, gamma)).tolist() for _ in range(r_n)]
        r, j = int(rng.integers(r_n)), int(rng.integers(1, gamma))
        changed = [list(c) for c in curves]
        changed[r][j:] = (curves[r][j - 1] * np.cumprod(rng.uniform(0.0, 1.0, gamma - j))).tolist()
        before, after = schedule(curves, sps)[0][r], schedule(changed, sps)[0][r]
        assert min(before, j) == min(after, j)
    # the global search looks ahead: later slots change an earlier cut (so it needs lagged curves)
    sps = {1: 100, 2: 100, 3: 60, 4: 60, 5: 60}.__getitem__
    assert schedule_global([[0.9, 0.85, 0.8, 0.75]], sps)[0] == [4]
    assert schedule_global([[0.9, 0.85, 0.1, 0.05]], sps)[0] == [1]


def test_threshold_lengths():
    assert threshold_lengths([[0.9, 0.6, 0.3], [0.4, 0.2, 0.1], [0.95, 0.99, 0.5]], 0.5) == [2, 0, 3]
    assert threshold_lengths([[0.9, 0.6]], 0.0) == [2]


def test_sps_curve():
    c = SPSCurve([1, 3, 5], [100.0, 50.0, 25.0])  # step times 0.01, 0.02, 0.04
    assert c(1) == pytest.approx(100) and c(0.5) == pytest.approx(100)
    assert c.step_time(2) == pytest.approx(0.015) and c.step_time(4) == pytest.approx(0.03)
    assert c.step_time(7) == pytest.approx(0.06)  # extrapolated with the last slope
    assert SPSCurve([4], [10.0])(100) == 10.0
    with pytest.raises(ValueError, match="increasing"):
        SPSCurve([2, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        SPSCurve([1, 2], [1.0, 0.0])


def test_sps_curve_load(tmp_path):
    p = tmp_path / "sps.json"
    p.write_text(json.dumps({"sps_profile": {"tokens": [1, 8], "steps_per_s": [10.0, 5.0]}}))
    assert SPSCurve.load(str(p)).tokens == [1, 8]
    p.write_text(json.dumps({"tokens": [1, 8]}))
    with pytest.raises(ValueError, match="steps_per_s"):
        SPSCurve.load(str(p))


def _draft(conf_logits):
    z = torch.tensor(conf_logits)
    return Draft(
        tokens=torch.zeros(len(conf_logits), dtype=torch.long),
        probs=torch.zeros(len(conf_logits), 4),
        confidence=torch.sigmoid(z),
        confidence_logits=z,
    )


def test_verify_len_callables():
    sps = affine_sps(10, 1)
    z = [2.0, 1.0, -3.0]  # a ≈ .88, .64, .03
    a = np.cumprod(1 / (1 + np.exp(-np.array(z))))
    f = causal_verify_len(sps)
    assert f(0, _draft(z)) == schedule([a.tolist()], sps)[0][0] == 2
    # STS temperatures enter the curve: softening slot 3's logit (T_3 = 5) raises a_3 from .03 to .23,
    # and Θ goes 2.523/13 = .1941 -> 2.751/14 = .1965: now worth verifying
    assert causal_verify_len(sps, [1.0, 1.0, 5.0])(0, _draft(z)) == 3
    # other requests in the step compete for the same budget
    busy = causal_verify_len(affine_sps(1, 1), others=[[0.99, 0.98, 0.97]] * 3)
    assert busy(0, _draft(z)) < 2
    g = lagged_verify_len(sps, lag=2)
    assert [g(i, _draft(z)) for i in range(2)] == [3, 3]  # full block until a lagged curve exists
    assert (
        g(2, _draft([-9.0, -9.0, -9.0])) == schedule_global([a.tolist()], sps)[0][0]
    )  # uses round 0's curve
    with pytest.raises(ValueError, match="confidence head"):
        f(0, Draft(tokens=torch.zeros(2), probs=torch.zeros(2, 2), confidence=None, confidence_logits=None))


# ---------------------------------------------------------------- replay


def calibrated_rounds(n=4000, gamma=7, seed=0):
    """Curves a_k = Π c_i whose outcomes are drawn from the same c_i: perfectly calibrated recordings."""
    rng = np.random.default_rng(seed)
    c = 1 / (1 + np.exp(-rng.normal(1.0, 1.5, size=(n, gamma))))
    ok = rng.random((n, gamma)) < c
    accepted = np.where(ok.all(1), gamma, np.argmin(ok, axis=1))
    return np.cumprod(c, axis=1), accepted


def test_replay_accounting_by_hand():
    curves = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6]])
    accepted = np.array([1, 3])
    fixed = replay.simulate(curves, accepted, lambda b: 1.0, 1, "fixed")
    assert fixed["steps"] == 2 and fixed["tokens_per_request_step"] == pytest.approx((2 + 4) / 2)  # = τ
    assert fixed["expected_tokens_per_s"] == pytest.approx((2.5 + 3.1) / 2)
    # threshold .55: ℓ = [1, 3] -> min(1,1)+1 + min(3,3)+1 = 6 tokens in 2 unit steps
    thr = replay.simulate(curves, accepted, lambda b: 1.0, 1, "threshold", threshold=0.55)
    assert thr["mean_verify_len"] == 2.0 and thr["realised_tokens_per_s"] == 3.0
    # two requests share one step of B = (3+1) + (3+1) = 8 tokens
    both = replay.simulate(curves, accepted, lambda b: 1.0 / b, 2, "fixed")
    assert (
        both["steps"] == 1
        and both["mean_batch_tokens"] == 8
        and both["realised_tokens_per_s"] == pytest.approx(6 / 8)
    )
    assert both["per_request_tokens_per_s"] == pytest.approx(3 / 8)
    sweep = replay.threshold_sweep(curves, accepted, [0.0, 0.55, 1.5])
    assert sweep[0]["tokens_per_step"] == 3.0 and sweep[0]["acceptance_rate"] == pytest.approx(4 / 6)
    assert sweep[0]["wasted_per_step"] == 1.0  # round 1 verified 3, kept 1
    assert sweep[1]["tokens_per_step"] == 3.0 and sweep[1]["wasted_per_step"] == 0.0
    assert sweep[2]["mean_verify_len"] == 0 and sweep[2]["tokens_per_step"] == 1.0


@pytest.mark.parametrize(
    "sps",
    [
        SPSCurve([1, 8, 64, 512], [200.0, 190.0, 120.0, 25.0]),
        SPSCurve([1, 512], [100.0, 100.0 / 52]),
    ],  # affine: t = 1 + B/10
    ids=["measured-like", "affine"],
)
def test_scheduled_beats_fixed_at_every_concurrency(sps):
    curves, accepted = calibrated_rounds()
    levels = [1, 2, 4, 8, 16, 32, 64]
    rep = replay.concurrency_sweep(curves, accepted, sps, levels, [round(0.05 * i, 2) for i in range(20)])
    ratios = [row["scheduled_over_fixed"] for row in rep["levels"]]
    assert all(r >= 1.0 for r in ratios), ratios
    assert ratios[-1] > 1.3  # under load, cutting hopeless tails pays
    for row in rep["levels"]:
        s = row["policies"]["scheduled"]
        # calibrated curves: what the scheduler expected is what it got
        assert s["realised_tokens_per_s"] == pytest.approx(s["expected_tokens_per_s"], rel=0.05)
        assert row["policies"]["fixed"]["mean_verify_len"] == 7
    # the fixed policy realises τ tokens per request-step
    assert rep["levels"][0]["policies"]["fixed"]["tokens_per_request_step"] == pytest.approx(
        1 + accepted.mean()
    )


def test_gain_interval_over_prompts():
    """Per-prompt tokens and time shares add up to the simulated throughput; the interval of the
    scheduled/fixed ratio brackets the point value, and a policy against itself is exactly 1."""
    curves, accepted = calibrated_rounds(n=1200)
    prompt = np.repeat(np.arange(60), 20)  # 60 prompts of 20 rounds
    sps = SPSCurve([1, 8, 64, 512], [200.0, 190.0, 120.0, 25.0])
    sched = replay.simulate(curves, accepted, sps, 16, "scheduled", prompt=prompt)
    fixed = replay.simulate(curves, accepted, sps, 16, "fixed", prompt=prompt)
    pp = sched["per_prompt"]
    assert pp["prompt"] == list(range(60))
    assert sum(pp["tokens"]) / sum(pp["time_s"]) == pytest.approx(sched["realised_tokens_per_s"], rel=1e-12)
    iv = replay.gain_interval(sched, fixed)
    ratio = sched["realised_tokens_per_s"] / fixed["realised_tokens_per_s"]
    assert iv.value == pytest.approx(ratio, rel=1e-12) and iv.low < ratio < iv.high
    assert iv.low > 1.0 and iv.prompts == 60 and iv.seeds == 1  # under load the cut pays, clearly
    same = replay.gain_interval(sched, sched)
    assert (same.low, same.value, same.high) == pytest.approx((1.0, 1.0, 1.0))
    other = replay.simulate(curves[:600], accepted[:600], sps, 16, "fixed", prompt=prompt[:600])
    with pytest.raises(ValueError, match="different prompts"):
        replay.gain_interval(sched, other)
    rep = replay.concurrency_sweep(curves, accepted, sps, [1, 16], [0.0, 0.5], prompt=prompt)
    row = rep["levels"][1]
    got = row["scheduled_over_fixed_best_interval"]
    assert (
        got["value"] == pytest.approx(row["scheduled_over_fixed_best"])
        and got["low"] <= got["value"] <= got["high"]
    )
    assert "per_prompt" not in row["policies"]["scheduled"]


def test_profile_sps_on_a_tiny_target():
    from test_spec_decode import make_target

    from deepspec.eval.profile import default_token_counts, profile_sps

    torch.set_num_threads(1)
    assert default_token_counts(8, 4) == [1, 2, 4, 8, 16, 32]
    curve = profile_sps(make_target(vocab=32), [1, 8, 20], block=8, context=16, repeats=2)
    assert curve.tokens == [1, 8, 21]  # 20 tokens = 3 rows of 7
    assert all(s > 0 for s in curve.steps_per_s)
    assert all(b <= a for a, b in zip(curve.steps_per_s, curve.steps_per_s[1:]))


def test_monotone_times():
    from deepspec.eval.profile import monotone_times

    assert monotone_times([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    # one slow reading at B=2 is pooled with its neighbour instead of raising every later size
    assert monotone_times([1.0, 5.0, 3.0, 6.0]) == [1.0, 4.0, 4.0, 6.0]


def test_vectorised_schedule_matches_the_loop():
    from deepspec.eval.scheduler import schedule_array

    rng = np.random.default_rng(3)
    curves_sps = [
        SPSCurve([1, 8, 64, 512], [100.0, 90.0, 40.0, 6.0]),
        affine_sps(10, 1),
        {b: s for b, s in zip(range(1, 200), np.repeat([100, 60, 55, 20], 50))}.__getitem__,
    ]
    for _ in range(300):
        r_n, gamma = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        c = np.cumprod(rng.uniform(0.2, 1.0, (r_n, gamma)), axis=1)
        c[rng.random(c.shape) < 0.1] = 0.0  # zero estimates are never visited
        c = np.round(c, 1)  # ties between requests and slots
        for sps in curves_sps:
            assert schedule_array(c, sps).tolist() == schedule(c.tolist(), sps)[0]
            assert schedule_array(c, sps, global_search=True).tolist() == schedule_global(c.tolist(), sps)[0]
