import numpy as np
import pytest

from deepspec.eval import intervals


def _simulate(rng, n_seeds, n_prompts, accept_p, seed_sd=0.0, difficulty=None):
    """Per seed, per prompt (rounds, accepted): each round accepts Binomial(γ=4, p) drafts, with p
    shifted per seed (seed effect) and per prompt (difficulty, shared across drafters when given)."""
    out = []
    for s in range(n_seeds):
        p_seed = np.clip(accept_p + rng.normal(0, seed_sd), 0.01, 0.99)
        rows = []
        for i in range(n_prompts):
            d = difficulty[s][i] if difficulty is not None else 0.0
            p = np.clip(p_seed + d, 0.01, 0.99)
            rounds = int(rng.integers(5, 30))
            rows.append([rounds, int(rng.binomial(4, p, size=rounds).sum())])
        out.append(rows)
    return out


def test_tau_value_and_interval_bracket_it():
    counts = [[[10, 5], [20, 30]], [[5, 5], [10, 0]]]
    iv = intervals.tau_interval(counts, n_boot=500)
    assert iv.value == pytest.approx(1 + 40 / 45)
    assert iv.low <= iv.value <= iv.high
    assert (iv.seeds, iv.prompts) == (2, 2)


def test_same_inputs_same_interval():
    counts = _simulate(np.random.default_rng(1), 3, 16, 0.4)
    a, b = intervals.tau_interval(counts), intervals.tau_interval(counts)
    assert (a.low, a.high) == (b.low, b.high)


def test_coverage_near_nominal_over_prompts_and_seeds():
    # The true τ of the process: 1 + 4 * p̄ where p̄ averages the seed effect (mean zero, clipped
    # rarely). Coverage over repeated experiments must be near 95 %, not 60 % or 100 %.
    rng = np.random.default_rng(0)
    true_tau = 1 + 4 * 0.4
    hits = 0
    n_exp = 150
    for _ in range(n_exp):
        counts = _simulate(rng, 5, 24, 0.4, seed_sd=0.03)
        iv = intervals.tau_interval(counts, n_boot=800, seed=int(rng.integers(1 << 30)))
        hits += iv.low <= true_tau <= iv.high
    assert 0.85 <= hits / n_exp <= 0.995


def test_paired_ratio_is_narrower_than_unpaired_and_detects_a_real_gain():
    rng = np.random.default_rng(3)
    difficulty = [list(rng.normal(0, 0.15, 32)) for _ in range(3)]
    a = _simulate(rng, 3, 32, 0.45, difficulty=difficulty)
    b = _simulate(rng, 3, 32, 0.35, difficulty=difficulty)
    paired = intervals.tau_ratio_interval(a, b)
    assert paired.value > 1
    assert paired.excludes(1.0)
    # Unpaired: shuffle b's prompt order so the shared difficulty no longer lines up.
    b_shuffled = [list(np.asarray(c)[rng.permutation(len(c))]) for c in b]
    unpaired = intervals.tau_ratio_interval(a, b_shuffled)
    assert paired.high - paired.low < unpaired.high - unpaired.low


def test_no_difference_is_not_claimed_for_identical_processes():
    rng = np.random.default_rng(5)
    claimed = 0
    for _ in range(40):
        a = _simulate(rng, 3, 16, 0.4)
        b = _simulate(rng, 3, 16, 0.4)
        claimed += intervals.tau_ratio_interval(a, b, n_boot=800).excludes(1.0)
    assert claimed <= 5  # about 5 % false claims expected at the 95 % level


def test_single_seed_resamples_prompts_only():
    iv = intervals.tau_interval([[[10, 4], [10, 6], [10, 5]]], n_boot=300)
    assert iv.seeds == 1 and iv.low < iv.value < iv.high


def test_mean_and_ratio_of_sums():
    iv = intervals.mean_interval([[1.0, 2.0, 3.0], [4.0]], n_boot=300)
    assert iv.value == pytest.approx(2.5)
    r = intervals.ratio_of_sums_interval([[2.0, 4.0]], [[1.0, 1.0]], n_boot=300)
    assert r.value == pytest.approx(3.0)
    assert 2.0 <= r.low <= r.high <= 4.0


def test_bad_shapes_name_the_seed():
    with pytest.raises(ValueError, match="seed 1 has 2 vs 3 prompts"):
        intervals.tau_ratio_interval([[[1, 1]], [[1, 1], [1, 1]]], [[[1, 1]], [[1, 1]] * 3])
    with pytest.raises(ValueError, match="2 seeds vs 1"):
        intervals.tau_ratio_interval([[[1, 1]], [[1, 1]]], [[[1, 1]]])
    with pytest.raises(ValueError, match="no seeds"):
        intervals.tau_interval([])


def test_prompt_counts_from_rounds_records():
    recs = [
        {"dataset": "prompts", "temperature": 0.0, "prompt": 1, "accepted": 2},
        {"dataset": "prompts", "temperature": 0.0, "prompt": 0, "accepted": 1},
        {"dataset": "prompts", "temperature": 0.0, "prompt": 1, "accepted": 0},
        {"dataset": "prompts", "temperature": 1.0, "prompt": 0, "accepted": 3},
    ]
    assert intervals.prompt_counts(recs, 0.0) == [[1, 1], [2, 2]]
    assert intervals.prompt_counts(recs, 1) == [[1, 3]]
    with pytest.raises(ValueError, match="no rounds at temperature 0.5"):
        intervals.prompt_counts(recs, 0.5)


def test_prompt_counts_keeps_prompts_without_rounds_aligned():
    recs = [
        {"temperature": 0.0, "prompt": 2, "accepted": 2},
        {"temperature": 0.0, "prompt": 0, "accepted": 1},
    ]
    assert intervals.prompt_counts(recs, 0.0, num_prompts=4) == [[1, 1], [0, 0], [1, 2], [0, 0]]
    with pytest.raises(ValueError, match="rounds of prompt 2 found, but num_prompts=2"):
        intervals.prompt_counts(recs, 0.0, num_prompts=2)


def test_gain_ratio_interval_is_the_ratio_of_two_paired_ratios():
    # a doubles its accepted drafts over b at the second setting only: gain ratio < 1 everywhere
    a1 = [[[10, 20], [10, 30]], [[10, 25], [10, 20]]]
    b1 = [[[10, 5], [10, 5]], [[10, 5], [10, 6]]]
    a2 = [[[10, 10], [10, 12]], [[10, 11], [10, 10]]]
    iv = intervals.gain_ratio_interval(a1, b1, a2, b1)
    ta1, tb1, ta2 = 1 + 95 / 40, 1 + 21 / 40, 1 + 43 / 40
    assert iv.value == pytest.approx((ta1 / tb1) / (ta2 / tb1))
    assert iv.low <= iv.value <= iv.high and iv.low > 1 and iv.seeds == 2
    same = intervals.gain_ratio_interval(a1, b1, a1, b1)
    assert same.value == same.low == same.high == pytest.approx(1.0)
    with pytest.raises(ValueError, match="seed 1 has"):
        intervals.gain_ratio_interval(a1, b1, a2, [b1[0], b1[1][:1]])
