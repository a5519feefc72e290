"""Confidence metrics and sequential temperature scaling (docs/method.md, Calibration: sequential temperature scaling) on synthetic rounds with known truth."""

from __future__ import annotations

import numpy as np
import pytest

from deepspec.eval import calibration as cal


def synthetic_rounds(n=6000, gamma=5, overconfidence=(3.0,) * 5, seed=0, prompts=200):
    """Rounds whose true conditional acceptance at slot k is σ(s_k); the head reports z_k = m_k·s_k.

    With m_k > 1 the head is over-confident (the paper's raw heads), and T_k = m_k calibrates it exactly.
    """
    rng = np.random.default_rng(seed)
    s = rng.normal(1.2, 1.5, size=(n, gamma))
    c = 1 / (1 + np.exp(-s))
    ok = rng.random((n, gamma)) < c
    accepted = np.where(ok.all(1), gamma, np.argmin(ok, axis=1))  # first rejection = prefix length
    z = s * np.asarray(overconfidence)[None, :]
    return cal.ConfidenceData(z, accepted, np.full(n, gamma), rng.integers(0, prompts, n))


def test_metrics_by_hand():
    pred = np.array([0.1, 0.4, 0.35, 0.8, 0.9])
    obs = np.array([0, 0, 1, 1, 1])
    # AUC: positives {0.35, 0.8, 0.9} vs negatives {0.1, 0.4}: 5 of 6 pairs ordered right
    assert cal.auc(pred, obs) == pytest.approx(5 / 6)
    assert cal.auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # ties count one half
    assert np.isnan(cal.auc(pred, np.ones(5)))
    assert cal.brier(pred, obs) == pytest.approx(np.mean((pred - obs) ** 2))
    # 2 bins: [0, .5) holds .1 .4 .35 (mean .2833, freq 1/3); [.5, 1] holds .8 .9 (mean .85, freq 1)
    assert cal.ece(pred, obs, bins=2) == pytest.approx(3 / 5 * abs(0.85 / 3 - 1 / 3) + 2 / 5 * 0.15)
    assert cal.ece(np.array([1.0, 0.0]), np.array([1, 0]), bins=15) == 0.0  # 1.0 lands in the last bin
    rel = cal.reliability(pred, obs, bins=2)
    assert [r["count"] for r in rel] == [3, 2] and rel[1]["frequency"] == 1.0
    z = np.array([[0.0, 2.0, -1.0]])
    a = cal.survival_estimates(z, [1.0, 2.0, 0.5])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    assert a[0] == pytest.approx(np.cumprod([sig(0.0), sig(1.0), sig(-2.0)]))


def test_events_and_scored_slots():
    d = cal.ConfidenceData(np.zeros((3, 3)), np.array([0, 2, 3]), np.array([3, 3, 1]), np.arange(3))
    assert d.events().tolist() == [[False, False, False], [True, True, False], [True, True, True]]
    assert d.scored().tolist() == [[True] * 3, [True] * 3, [True, False, False]]


def test_sts_fixes_overconfidence_and_keeps_ranking():
    data = synthetic_rounds()
    rep = cal.calibration_report(data, calibration_fraction=0.5, bins=15, seed=0)
    temps = rep["sts_temperatures"]
    # recovers the known miscalibration (ECE is a noisy objective, more so on later, rarer slots)
    assert all(abs(t - 3.0) <= 0.25 for t in temps[:2]) and all(2.0 <= t <= 4.5 for t in temps), temps
    assert rep["mean_ece_before"] > 0.05  # the raw head is badly calibrated ...
    assert rep["mean_ece_after"] < 0.02  # ... and STS fixes it on held-out prompts
    # what is left is mostly sampling noise: a perfectly calibrated head would show about as much
    assert rep["mean_ece_after"] < 2 * rep["mean_ece_floor_after"] + 0.005
    for b, a in zip(rep["before"], rep["after"]):
        assert a["ece"] < b["ece"] and a["brier"] < b["brier"]
        # each c_k is rescaled monotonically: its ranking (conditional AUC) is exactly unchanged
        assert a["conditional_auc"] == pytest.approx(b["conditional_auc"], abs=1e-12)
        # the product of several rescaled factors can only move slightly
        assert a["auc"] == pytest.approx(b["auc"], abs=0.02)
    assert rep["after"][0]["auc"] == pytest.approx(rep["before"][0]["auc"], abs=1e-12)  # a_1 = c_1
    # fitted and scored on disjoint prompts
    assert rep["calibration_rounds"] + rep["evaluation_rounds"] == len(data)
    cal_set, test_set = cal.split_by_prompt(data, 0.5, 0)
    assert not set(cal_set.prompt) & set(test_set.prompt)


def test_sts_underconfident_slot_gets_t_below_one():
    data = synthetic_rounds(overconfidence=(0.4, 1.0, 1.0, 1.0, 1.0))
    temps = cal.fit_sts(data)
    assert 0.25 <= temps[0] <= 0.55 and all(abs(t - 1) <= 0.3 for t in temps[1:])


def test_sts_is_sequential():
    """Slot 2 is calibrated given the already-fixed T_1, not on its own.

    Slot 1 is over-confident by 3x, slot 2 is calibrated as a conditional. Sequential fitting finds
    T_1 ≈ 3 and then T_2 ≈ 1. Fitting slot 2 with T_1 left at 1 would push T_2 away from 1 to make
    up for slot 1's error.
    """
    data = synthetic_rounds(gamma=2, overconfidence=(3.0, 1.0))
    t1, t2 = cal.fit_sts(data)
    assert abs(t1 - 3) <= 0.5 and abs(t2 - 1) <= 0.25
    # a brute-force reference that follows docs/method.md's wording literally
    y = data.events()
    ref = []
    prefix = np.ones(len(data))
    for k in range(2):
        scores = []
        for t in cal.STS_GRID:
            scores.append((cal.ece(prefix * cal._sigmoid(data.logits[:, k] / t), y[:, k], 15), abs(t - 1), t))
        best = min(scores)[2]
        ref.append(float(best))
        prefix = prefix * cal._sigmoid(data.logits[:, k] / best)
    assert [t1, t2] == pytest.approx(ref)
    # non-sequential (T_1 = 1 while fitting slot 2) gives a different, compensating T_2
    alone = cal.ConfidenceData(data.logits.copy(), data.accepted, data.verified, data.prompt)
    e = [
        cal.ece(cal._sigmoid(alone.logits[:, 0]) * cal._sigmoid(alone.logits[:, 1] / t), y[:, 1], 15)
        for t in cal.STS_GRID
    ]
    assert abs(cal.STS_GRID[int(np.argmin(e))] - 1) > 0.5


def test_sts_ties_go_toward_one():
    n = 400
    rng = np.random.default_rng(1)
    acc = rng.integers(0, 3, n)
    # slot 1: every logit is 0, so σ(0/T) = 0.5 for every T: all ECEs tie -> T = 1
    # slot 2: logits carry information; slot 3: nobody reached it -> no information -> T = 1
    z = np.stack([np.zeros(n), np.where(acc >= 2, 1.0, -1.0) * 2, rng.normal(size=n)], axis=1)
    data = cal.ConfidenceData(z, np.minimum(acc, 2), np.full(n, 3), np.arange(n))
    temps = cal.fit_sts(data)
    assert temps[0] == 1.0 and temps[2] == 1.0 and temps[1] != 1.0
    # on a grid without 1.0, the tie goes to the nearest value on either side
    assert cal.fit_sts(data, grid=[3.0, 0.5, 1.4])[0] == 1.4
    assert cal.fit_sts(data, grid=[0.2, 0.5, 2.0])[0] == 0.5  # |0.5 - 1| < |2 - 1|


def test_split_and_from_rounds():
    from deepspec.eval.spec_decode import RoundRecord

    rounds = [
        [RoundRecord(3, 3, a, confidence_logits=[1.0, 0.0, -1.0]) for a in (0, 3)],
        [RoundRecord(3, 3, 1, confidence_logits=[2.0, 1.0, 0.0])],
        [],
    ]
    d = cal.from_rounds(rounds)
    assert d.logits.shape == (3, 3) and d.accepted.tolist() == [0, 3, 1] and d.prompt.tolist() == [0, 0, 1]
    assert cal.from_rounds([[RoundRecord(3, 3, 1)]]) is None  # no confidence head
    with pytest.raises(ValueError, match="2 prompts"):
        cal.split_by_prompt(d.subset(d.prompt == 0), 0.5)
    with pytest.raises(ValueError, match="calibration_fraction"):
        cal.split_by_prompt(d, 1.0)
    with pytest.raises(ValueError, match="positive"):
        cal.survival_estimates(d.logits, [1.0, 0.0, 1.0])
