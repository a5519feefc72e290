"""Speculative decoding: the acceptance rule, losslessness (greedy exact, T=1 statistical), metrics, evaluator."""

from __future__ import annotations

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import chi2
from tiny_models import tiny_target

from deepspec.config import DrafterConfig, EvalConfig
from deepspec.eval import metrics, spec_decode
from deepspec.eval.runner import evaluate
from deepspec.eval.spec_decode import RoundRecord, speculative_generate, target_generate, verify
from deepspec.models.base import Draft
from deepspec.models.config import resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter
from deepspec.target.adapter import TargetModel

LAYER_IDS = [0, 1, 2]
ALPHA = 1e-3  # false-alarm rate of each statistical test (seeds are fixed, so runs are deterministic)


# ---------------------------------------------------------------- fixtures


def make_target(vocab=32, hidden=32, seed=0, init_range=0.3, layers=4, family="qwen3") -> TargetModel:
    extra = {}
    if family == "gemma4":  # sliding + full attention layers, soft-capped logits, scaled embeddings
        extra = dict(sliding_window=4, final_logit_softcapping=5.0)
    model = tiny_target(
        family,
        layers=layers,
        vocab=vocab,
        seed=seed,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=init_range,  # large init: peaked, non-trivial p
        **extra,
    )
    return TargetModel(model.train(), LAYER_IDS)


def make_drafter(
    target, markov_rank=8, head_type="vanilla", block_size=3, seed=1, std=0.1, w2_std=0.3, target_config=None
) -> ParallelDrafter:
    tc = (target_config or target.config).to_dict()
    dc = resolve_drafter_config(
        DrafterConfig(
            num_layers=1,
            block_size=block_size,
            target_layer_ids=LAYER_IDS,
            markov_rank=markov_rank,
            markov_head_type=head_type,
        ),
        tc,
        mask_token_id=tc["vocab_size"] - 1,
    )
    d = ParallelDrafter(dc)
    d.init_weights(std=std, seed=seed)
    if target_config is None:
        d.load_target_head(target.embed_tokens.weight, target.lm_head.weight)
    if d.markov_head is not None:  # init_weights zeroes W2; make the Markov head matter
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            d.markov_head.markov_w2.weight.copy_(
                torch.randn(d.markov_head.markov_w2.weight.shape, generator=g) * w2_std
            )
    return d.eval()


@pytest.fixture(scope="module")
def target32():
    return make_target(vocab=32)


PROMPTS = [[3, 1, 4, 1, 5], [2, 7], [9]]


class OracleDrafter:
    """Drafts the target's own greedy continuation, optionally corrupting one slot per round.

    It also checks the decoder's bookkeeping: the anchor must sit at position = context length.
    """

    def __init__(self, block_size, vocab, prompt, reference, corrupt=False):
        self.config = SimpleNamespace(block_size=block_size)
        self.vocab, self.prompt_len, self.seq, self.corrupt, self.calls = (
            vocab,
            len(prompt),
            list(prompt) + reference,
            corrupt,
            0,
        )

    def draft(self, feats, anchor, temperature, generator=None, forced_tokens=None):
        n = feats.shape[1]
        assert self.seq[n] == anchor, "anchor is not at position = drafter context length"
        g = self.config.block_size
        toks = (self.seq[n + 1 : n + 1 + g] + [0] * g)[:g]
        if self.corrupt:  # reject at a different slot each round: exercises partial-accept crops
            k = self.calls % (g + 1)
            if k < g:
                toks[k] = (toks[k] + 1) % self.vocab
        self.calls += 1
        t = torch.tensor(toks)
        return Draft(
            tokens=t,
            probs=torch.nn.functional.one_hot(t, self.vocab).float(),
            confidence=None,
            confidence_logits=None,
        )


# ---------------------------------------------------------------- the rule


def one_hot_rows(ids, v=5):
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


def test_verify_greedy_cases():
    q = one_hot_rows([1, 2, 3])
    # all drafts match the target argmaxes -> bonus from p_4
    assert verify([1, 2, 3], q, one_hot_rows([1, 2, 3, 4]), 0.0) == (3, 4, [True, True, True])
    # mismatch at slot 2 -> correction = argmax p_2, later slots not accepted even if they match
    assert verify([1, 2, 3], q, one_hot_rows([1, 0, 3, 4]), 0.0) == (1, 0, [True, False, False])
    assert verify([1, 2, 3], q, one_hot_rows([4, 2, 3, 4]), 0.0) == (0, 4, [False, False, False])
    # no drafts verified: one plain target step
    assert verify([], q[:0], one_hot_rows([2]), 0.0) == (0, 2, [])
    # T=0 only looks at argmaxes of p, not at its sharpness
    p = torch.softmax(torch.tensor([[0.0, 3, 0, 0, 0], [0, 0, 2, 0, 0], [0, 0, 0, 0, 1.0]]), -1)
    assert verify([1, 2], q[:2], p, 0.0) == (2, 4, [True, True])


def test_verify_q_equals_p_accepts_all():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        p = torch.softmax(torch.randn(4, 7, generator=g) * 2, -1)
        x = torch.multinomial(p[:3], 1, generator=g).squeeze(1)
        n, _, mask = verify(x, p[:3], p, 1.0, g)
        assert n == 3 and mask == [True] * 3


def test_verify_rejects_bad_input():
    with pytest.raises(ValueError, match="temperature"):
        verify([1], one_hot_rows([1]), one_hot_rows([1, 2]), -0.5)
    with pytest.raises(ValueError, match="target rows"):
        verify([1, 2], one_hot_rows([1, 2]), one_hot_rows([1, 2]), 1.0)


def g_test_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """G-test of observed counts against exact cell probabilities.

    Cells expected to hold fewer than ``min_expected`` samples are pooled into one, so the χ²
    approximation holds; a sample in a zero-probability cell is an immediate rejection.
    """
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts[probs == 0].sum() > 0:
        return 0.0
    n = counts.sum()
    exp = n * probs
    big = exp >= min_expected
    obs_cells = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp_cells = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_cells > 0
    obs_cells, exp_cells = obs_cells[keep], exp_cells[keep]
    nz = obs_cells > 0
    g = 2 * (obs_cells[nz] * (obs_cells[nz] / exp_cells[nz]).log()).sum().item()
    return float(chi2.sf(g, len(obs_cells) - 1))


def test_verify_single_slot_is_lossless_at_t1():
    """Pure rule: a draft from q, then accept-or-resample, gives tokens distributed as p."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0], [1 / 6] * 6])
    q = torch.tensor([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3]])
    counts = torch.zeros(6)
    for _ in range(4000):
        x = torch.multinomial(q[0], 1, generator=g)
        n, nxt, _ = verify(x, q, p, 1.0, g)
        counts[int(x) if n == 1 else nxt] += 1
    assert g_test_pvalue(counts, p[0]) > ALPHA
    assert g_test_pvalue(counts, q[0]) < ALPHA  # the test can tell p from q


# ---------------------------------------------------------------- greedy = target


@pytest.mark.parametrize(
    "markov",
    [("vanilla", 8), ("gated", 8), ("rnn", 8), ("vanilla", 0)],
    ids=["vanilla", "gated", "rnn", "off"],
)
def test_greedy_speculative_equals_target(target32, markov):
    drafter = make_drafter(target32, markov_rank=markov[1], head_type=markov[0], block_size=3)
    for prompt in PROMPTS:
        ref = target_generate(target32, prompt, 20, 0.0)
        out = speculative_generate(target32, drafter, prompt, 20, 0.0)
        assert out.tokens == ref.tokens
        assert len(out.tokens) == 20 and not out.stopped


@pytest.mark.parametrize("corrupt", [False, True], ids=["oracle", "corrupted-oracle"])
def test_greedy_with_accepting_drafters(target32, corrupt):
    """Drafts the target agrees with (all or a prefix): exercises bonus tokens and partial crops."""
    gamma, max_new = 4, 23
    for prompt in PROMPTS:
        ref = target_generate(target32, prompt, max_new + gamma + 1, 0.0).tokens
        drafter = OracleDrafter(gamma, 32, prompt, ref, corrupt)
        out = speculative_generate(target32, drafter, prompt, max_new, 0.0, draft_cache=False)
        assert out.tokens == ref[:max_new]
        accepted = [r.accepted for r in out.rounds]
        if corrupt:
            assert set(accepted) == set(range(gamma + 1))  # every cut point, full block included
        else:
            assert all(a == gamma for a in accepted)


def test_stop_ids_truncate_like_target(target32):
    drafter = make_drafter(target32)
    prompt = PROMPTS[0]
    ref = target_generate(target32, prompt, 20, 0.0).tokens
    stop = ref[7]
    cut = ref.index(stop) + 1
    assert target_generate(target32, prompt, 20, 0.0, [stop]).tokens == ref[:cut]
    for d, cache in ((drafter, True), (OracleDrafter(4, 32, prompt, ref + [0] * 5), False)):
        out = speculative_generate(target32, d, prompt, 20, 0.0, [stop], draft_cache=cache)
        assert out.tokens == ref[:cut] and out.stopped


# ---------------------------------------------------------------- T=1 lossless (statistical)


def exact_joint(target, prompt, n_tokens):
    """P(t1..tn | prompt) at T=1 for every sequence, by enumeration over the vocabulary."""
    model, v = target.model, target.vocab_size
    joint = torch.ones([])
    with torch.no_grad():
        for depth in range(n_tokens):
            prefixes = list(itertools.product(range(v), repeat=depth))
            ids = torch.tensor([list(prompt) + list(s) for s in prefixes])
            probs = torch.softmax(model(ids).logits[:, -1].double(), -1)  # [v^depth, v]
            joint = joint.reshape(-1, 1) * probs
    return joint.reshape([v] * n_tokens)


def sample_counts(target, drafter, prompt, n_tokens, reps, seed, verify_len=None):
    v = target.vocab_size
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros([v] * n_tokens)
    rounds = []
    for _ in range(reps):
        out = speculative_generate(target, drafter, prompt, n_tokens, 1.0, (), g, verify_len=verify_len)
        counts[tuple(out.tokens)] += 1
        rounds += out.rounds
    return counts, rounds


@pytest.fixture(scope="module")
def tiny_vocab_setup():
    target = make_target(vocab=6, seed=3, init_range=0.15)
    drafter = make_drafter(target, markov_rank=8, block_size=2, seed=5, std=0.3, w2_std=1.0)
    prompt = [1, 4, 2]
    return target, drafter, prompt, exact_joint(target, prompt, 3)


@pytest.fixture(scope="module")
def tiny_vocab_gemma4():
    """The same check on a non-Qwen family: Gemma 4 (sliding window 4, so verification crops a
    sliding-window cache; soft-capped logits on both sides)."""
    target = make_target(vocab=6, seed=3, init_range=0.15, family="gemma4")
    drafter = make_drafter(target, markov_rank=8, block_size=2, seed=5, std=0.3, w2_std=1.0)
    prompt = [1, 4, 2, 5, 0, 3]
    return target, drafter, prompt, exact_joint(target, prompt, 3)


@pytest.mark.slow
def test_t1_lossless_full_block_gemma4(tiny_vocab_gemma4):
    target, drafter, prompt, exact = tiny_vocab_gemma4
    assert drafter.config.model_type == "gemma4_text" and drafter.config.final_logit_softcapping == 5.0
    counts, rounds = sample_counts(target, drafter, prompt, 3, 3000, seed=13)
    acc = [r.accepted for r in rounds]
    assert 0.1 < sum(a > 0 for a in acc) / len(acc) < 0.9 and 2 in acc
    assert g_test_pvalue(counts, exact) > ALPHA


@pytest.mark.slow
def test_t1_lossless_full_block(tiny_vocab_setup):
    target, drafter, prompt, exact = tiny_vocab_setup
    counts, rounds = sample_counts(target, drafter, prompt, 3, 3000, seed=11)
    # Both branches of the rule ran (otherwise the test would prove little).
    acc = [r.accepted for r in rounds]
    assert 0.1 < sum(a > 0 for a in acc) / len(acc) < 0.9 and 2 in acc
    assert g_test_pvalue(counts, exact) > ALPHA


@pytest.mark.slow
def test_t1_lossless_variable_verify_len(tiny_vocab_setup):
    target, drafter, prompt, exact = tiny_vocab_setup
    # A scheduler's cut ℓ in {0, 1, 2} chosen at random each round: bonus after a partial block,
    # plain target steps (ℓ = 0), full blocks.
    rng = random.Random(7)
    counts, rounds = sample_counts(
        target, drafter, prompt, 3, 3000, seed=12, verify_len=lambda r, draft: rng.choice([0, 1, 2])
    )
    assert {r.verified for r in rounds} == {0, 1, 2}
    assert g_test_pvalue(counts, exact) > ALPHA


def _accept_all(draft_tokens, q_probs, p_probs, temperature, generator=None):
    ell = len(draft_tokens)
    return ell, int(torch.multinomial(p_probs[ell], 1, generator=generator)), [True] * ell


def _resample_from_p(draft_tokens, q_probs, p_probs, temperature, generator=None):
    # Right acceptance test, but the correction is drawn from p_k instead of normalize(max(p_k - q_k, 0)).
    n, nxt, mask = verify(draft_tokens, q_probs, p_probs, temperature, generator)
    if n < len(draft_tokens):
        nxt = int(torch.multinomial(p_probs[n], 1, generator=generator))
    return n, nxt, mask


@pytest.mark.slow
@pytest.mark.parametrize("wrong_rule", [_accept_all, _resample_from_p], ids=["accept-all", "resample-from-p"])
def test_t1_statistical_test_has_power(tiny_vocab_setup, monkeypatch, wrong_rule):
    """The same test, with a third of the samples, rejects lossy rules."""
    target, drafter, prompt, exact = tiny_vocab_setup
    monkeypatch.setattr(spec_decode, "verify", wrong_rule)
    counts, _ = sample_counts(target, drafter, prompt, 3, 1000, seed=13)
    assert g_test_pvalue(counts, exact) < ALPHA


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand():
    rounds = [RoundRecord(drafted=3, verified=3, accepted=a) for a in (3, 0, 1, 2, 3, 1)]
    assert metrics.tau(rounds) == pytest.approx(16 / 6)
    assert metrics.acceptance_rate(rounds) == pytest.approx(10 / 18)
    # slot 1: 5 of 6; slot 2: 3 of the 5 with slot 1 accepted; slot 3: 2 of the 3 with 1..2 accepted
    assert metrics.conditional_acceptance(rounds) == pytest.approx([5 / 6, 3 / 5, 2 / 3])
    assert metrics.survival(rounds) == pytest.approx([5 / 6, 3 / 6, 2 / 6])
    s = metrics.summarize(rounds, 3)
    assert s["accepted_histogram"] == [1, 2, 1, 2] and s["rounds"] == 6 and s["mean_confidence"] is None
    # A round that verified only 1 slot counts at slot 1 but not at slots 2..3.
    short = rounds + [RoundRecord(drafted=3, verified=1, accepted=1)]
    assert metrics.conditional_acceptance(short, 3) == pytest.approx([6 / 7, 3 / 5, 2 / 3])
    assert metrics.tokens_per_second(10, 2.0) == 5.0
    assert math.isnan(metrics.tau([]))


def test_tau_matches_token_count(target32):
    """Accounting: tokens = 1 (from the prefill) + Σ committed, and committed = τ except in a truncated last round."""
    gamma = 4
    for max_new, corrupt in ((1 + 5 * 4, False), (20, True)):
        prompt = PROMPTS[0]
        ref = target_generate(target32, prompt, max_new + gamma + 1, 0.0).tokens
        out = speculative_generate(
            target32, OracleDrafter(gamma, 32, prompt, ref, corrupt), prompt, max_new, 0.0, draft_cache=False
        )
        assert len(out.tokens) == 1 + sum(r.committed for r in out.rounds)
        assert (
            all(r.committed == r.tau for r in out.rounds[:-1])
            and out.rounds[-1].committed <= out.rounds[-1].tau
        )
        if not corrupt:  # budget chosen so no round is truncated
            assert metrics.tau(out.rounds) == (len(out.tokens) - 1) / len(out.rounds) == gamma + 1
    # a drafter's round records carry confidences and timings
    out = speculative_generate(
        target32, make_drafter(target32), PROMPTS[1], 10, 1.0, (), torch.Generator().manual_seed(0)
    )
    r = out.rounds[0]
    assert (
        len(r.confidence) == 3
        and all(0 < c < 1 for c in r.confidence)
        and r.draft_time > 0
        and r.verify_time > 0
    )
    assert len(out.tokens) <= 1 + sum(x.tau for x in out.rounds)


# ---------------------------------------------------------------- evaluator


def test_evaluate_writes_report(target32, tmp_path):
    drafter = make_drafter(target32)
    cfg = EvalConfig(temperatures=[0.0, 1.0], max_new_tokens=10, seed=3)
    rep = evaluate(target32, drafter, PROMPTS, cfg, stop_ids=[31], out_dir=str(tmp_path), progress=False)
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"eval.json", "rounds.jsonl", "acceptance_prompts.png"} <= set(names)
    assert not [n for n in names if ".tmp" in n or n.startswith(".")]  # no temp file left behind
    assert set(on_disk["temperatures"]) == {"0.0", "1.0"}
    greedy = on_disk["temperatures"]["0.0"]
    assert greedy["identical_outputs"] == len(PROMPTS)  # lossless at T=0
    for s in on_disk["temperatures"].values():
        assert len(s["conditional_acceptance"]) == len(s["survival"]) == 3
        assert 1 <= s["tau"] <= 4 and s["spec_tokens_per_s"] > 0 and s["target_tokens_per_s"] > 0
    # deterministic given the seed (timings aside)
    rep2 = evaluate(target32, drafter, PROMPTS, cfg, stop_ids=[31], progress=False)
    for t in ("0.0", "1.0"):
        for key in ("tau", "accepted", "proposed", "spec_new_tokens", "conditional_acceptance"):
            assert rep["temperatures"][t][key] == rep2["temperatures"][t][key]


def test_evaluate_rejects_mismatches(target32, monkeypatch):
    """Clear errors, raised before any decoding starts."""
    import deepspec.eval.runner as runner

    calls = []
    monkeypatch.setattr(runner, "generate", lambda *a, **k: calls.append(a))
    cfg = EvalConfig(temperatures=[0.0], max_new_tokens=4)
    other_vocab = make_target(vocab=40)
    other_hidden = make_target(hidden=64)
    cases = [
        (make_drafter(target32, target_config=other_vocab.config), "vocab_size"),
        (make_drafter(target32, target_config=other_hidden.config), "hidden size"),
    ]
    shifted = make_drafter(target32)
    shifted.config.target_layer_ids = [0, 1, 3]
    cases.append((shifted, "captures layers"))
    far = make_drafter(target32)
    far.config.target_layer_ids = [0, 1, 9]
    cases.append((far, "out of range"))
    bad_mask = make_drafter(target32)
    bad_mask.config.mask_token_id = 32
    cases.append((bad_mask, "mask_token_id"))
    for drafter, msg in cases:
        with pytest.raises(ValueError, match=msg):
            evaluate(target32, drafter, PROMPTS, cfg, stop_ids=[], progress=False)
    with pytest.raises(ValueError, match="temperatures"):
        evaluate(
            target32,
            make_drafter(target32),
            PROMPTS,
            EvalConfig(temperatures=[1.0, -1.0]),
            [],
            progress=False,
        )
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target32, make_drafter(target32), PROMPTS[0], 4, -0.1)
    with pytest.raises(ValueError, match="temperature"):
        target_generate(target32, PROMPTS[0], 4, -1.0)
    assert not calls
