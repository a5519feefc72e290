"""The drafter's KV cache and batched evaluation: the cached path drafts what the uncached one does,
a batch decodes each prompt as batch 1 does (T=0 and T=1, same seeds), greedy batches equal the
target's own greedy output, and the T=1 statistical lossless test holds on the batched path."""

from __future__ import annotations

import pytest
import torch
from test_spec_decode import ALPHA, exact_joint, g_test_pvalue, make_drafter, make_target

from deepspec.config import EvalConfig
from deepspec.eval.runner import evaluate
from deepspec.eval.spec_decode import generate, speculative_generate, target_generate
from deepspec.models.draft_cache import DraftCache
from deepspec.target.adapter import TargetModel

PROMPTS = [[3, 1, 4, 1, 5], [2, 7], [9], [5, 6, 7, 8, 9, 10, 11, 12], [4, 4]]


@pytest.fixture(scope="module")
def target():
    return make_target(vocab=32)


@pytest.fixture(scope="module")
def drafters(target):
    """DSpark with each Markov head kind and the confidence head, DFlash, and EAGLE-3 on the same target."""
    import test_eagle3 as te

    out = {
        "dspark-vanilla": make_drafter(target, markov_rank=8, head_type="vanilla", block_size=4),
        "dspark-rnn": make_drafter(target, markov_rank=8, head_type="rnn", block_size=3),
        "dflash": make_drafter(target, markov_rank=0, block_size=4),
    }
    hf = te.hf_target()
    out["eagle3"] = (TargetModel(hf, te.LAYER_IDS), te.eagle(hf, block_size=4))
    # Another layer family (Gemma 4 layers, a target with sliding-window layers): batch 1 only.
    gemma = make_target(vocab=32, family="gemma4")
    out["dspark-gemma4"] = (gemma, make_drafter(gemma, markov_rank=8, head_type="gated", block_size=4))
    return out


def pair(target, drafters, name):
    d = drafters[name]
    return d if isinstance(d, tuple) else (target, d)


def gens(seed, n):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def outcome(results):
    return [(r.tokens, [x.accepted for x in r.rounds], r.stopped) for r in results]


# ---------------------------------------------------------------- the drafter's cache


@pytest.mark.parametrize("name", ["dspark-vanilla", "dspark-rnn", "dflash", "eagle3", "dspark-gemma4"])
def test_cache_extended_in_pieces_drafts_like_full_context(target, drafters, name):
    """Context committed a few positions at a time, rows of different lengths: every row's draft
    equals draft() on its whole context (same tokens, same distributions, same confidences)."""
    tm, d = pair(target, drafters, name)
    torch.manual_seed(0)
    ids = torch.randint(0, tm.vocab_size - 1, (3, 14))
    feats = tm(ids).aux
    cache = DraftCache(3, "cpu")
    # Ragged steps: each row commits a different number of positions per step (the rest is padding).
    steps = [[4, 1, 6], [3, 5, 1], [2, 2, 4]]
    for counts in steps:
        counts = torch.tensor(counts)
        t = int(counts.max())
        idx = (cache.lengths[:, None] + torch.arange(t)).clamp(max=ids.shape[1] - 1)
        f = torch.gather(feats, 1, idx[:, :, None].expand(-1, -1, feats.shape[-1]))
        d.extend_cache(cache, f, torch.gather(ids, 1, idx), counts)
    n = cache.lengths.tolist()
    assert n == [9, 8, 11]
    anchors = torch.tensor([int(ids[b, n[b]]) for b in range(3)])
    for temp in (0.0, 1.0):
        batched = d.draft_cached(cache, anchors, temp, gens(5, 3))
        for b in range(3):
            ref = d.draft(
                feats[b : b + 1, : n[b]],
                int(anchors[b]),
                temp,
                gens(5, 3)[b],
                context_ids=ids[b : b + 1, : n[b]],
            )
            row = batched.row(b)
            assert row.tokens.tolist() == ref.tokens.tolist()
            torch.testing.assert_close(row.probs, ref.probs, rtol=1e-5, atol=1e-6)
            if ref.confidence is not None:
                torch.testing.assert_close(row.confidence, ref.confidence, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dspark-vanilla", "dspark-rnn", "dflash", "eagle3", "dspark-gemma4"])
def test_cached_decoding_equals_uncached(target, drafters, name):
    """speculative_generate with and without the drafter cache: token for token, at T=0 and T=1."""
    tm, d = pair(target, drafters, name)
    for temp in (0.0, 1.0):
        for i, prompt in enumerate(PROMPTS):
            a = speculative_generate(tm, d, prompt, 24, temp, (), torch.Generator().manual_seed(i))
            b = speculative_generate(
                tm, d, prompt, 24, temp, (), torch.Generator().manual_seed(i), draft_cache=False
            )
            assert outcome([a]) == outcome([b])


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("name", ["dspark-rnn", "dflash", "eagle3", "target-only"])
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_batch_decodes_each_prompt_as_batch_one(target, drafters, name, temp):
    """B = 5 and B = 2 (a last batch of 1) give every prompt the tokens B = 1 gives it, with rows
    stopping at different rounds (a stop id, the token budget)."""
    tm, d = (target, None) if name == "target-only" else pair(target, drafters, name)
    # A token prompt 0 produces early: its row stops while the others run on to the budget.
    stop = [generate(tm, d, PROMPTS[:1], 20, temp, (), gens(3, 1))[0].tokens[5]]
    single = [
        generate(tm, d, [p], 20, temp, stop, gens(3, len(PROMPTS))[i : i + 1])[0]
        for i, p in enumerate(PROMPTS)
    ]
    full = generate(tm, d, PROMPTS, 20, temp, stop, gens(3, len(PROMPTS)))
    assert outcome(full) == outcome(single)
    pairs = []
    for start in range(0, len(PROMPTS), 2):
        pairs += generate(
            tm, d, PROMPTS[start : start + 2], 20, temp, stop, gens(3, len(PROMPTS))[start : start + 2]
        )
    assert outcome(pairs) == outcome(single)
    lengths = {len(r.tokens) for r in full}
    assert len(lengths) > 1 and full[0].stopped  # rows really ended apart
    if d is not None:
        uncached = generate(tm, d, PROMPTS, 20, temp, stop, gens(3, len(PROMPTS)), draft_cache=False)
        assert outcome(uncached) == outcome(single)


@pytest.mark.parametrize("name", ["dspark-vanilla", "eagle3"])
def test_greedy_batch_equals_target_greedy(target, drafters, name):
    tm, d = pair(target, drafters, name)
    out = generate(tm, d, PROMPTS, 25, 0.0)
    for prompt, r in zip(PROMPTS, out):
        assert r.tokens == target_generate(tm, prompt, 25, 0.0).tokens
        assert len(r.tokens) == 1 + sum(x.committed for x in r.rounds)


def test_batch_timing_adds_up(target, drafters):
    """A round's wall time is shared by its rows: the rows' times sum to the batch's."""
    import time

    d = drafters["dspark-vanilla"]
    t0 = time.perf_counter()
    out = generate(target, d, PROMPTS, 16, 1.0, (), gens(1, len(PROMPTS)))
    wall = time.perf_counter() - t0
    total = sum(r.total_time for r in out)
    assert 0.5 * wall < total <= wall
    assert all(x.draft_time > 0 and x.verify_time > 0 for r in out for x in r.rounds)


def test_evaluator_results_do_not_depend_on_batch_size(target, drafters):
    d = drafters["dspark-vanilla"]
    reports = []
    for size in (1, 3):
        cfg = EvalConfig(temperatures=[0.0, 1.0], max_new_tokens=12, seed=4, batch_size=size)
        reports.append(evaluate(target, d, PROMPTS, cfg, stop_ids=[31], progress=False))
    one, three = reports
    assert three["batch_size"] == 3 and one["batch_size"] == 1
    assert one["temperatures"]["0.0"]["identical_outputs"] == len(PROMPTS)
    for t in ("0.0", "1.0"):
        for key in (
            "tau",
            "accepted",
            "proposed",
            "spec_new_tokens",
            "target_new_tokens",
            "identical_outputs",
        ):
            assert one["temperatures"][t][key] == three["temperatures"][t][key], (t, key)


def test_bad_batch_input(target, drafters):
    d = drafters["dspark-vanilla"]
    for bad in (0, -2, 1.5, True):
        cfg = EvalConfig(temperatures=[0.0], max_new_tokens=4, batch_size=bad)
        with pytest.raises(ValueError, match="eval.batch_size"):
            evaluate(target, d, PROMPTS, cfg, stop_ids=[], progress=False)
    with pytest.raises(ValueError, match="generators"):
        generate(target, d, PROMPTS, 4, 1.0, (), gens(0, 2))
    with pytest.raises(ValueError, match="empty"):
        generate(target, d, [[1, 2], []], 4, 0.0)


def test_batching_refuses_caches_it_cannot_pack(drafters):
    """A target with sliding-window cache layers (Gemma 4) decodes at batch 1 (the tests above) but
    refuses larger batches with a clear error."""
    gemma, d = drafters["dspark-gemma4"]
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer.*eval.batch_size=1"):
        generate(gemma, d, PROMPTS[:2], 8, 0.0)


# ---------------------------------------------------------------- T=1 lossless, batched


@pytest.mark.slow
def test_t1_lossless_on_the_batched_path():
    """Two prompts of different lengths, four rows each per batch: every row's 3-token output is
    distributed as the target's own T=1 distribution (G-test against the exact joint)."""
    target = make_target(vocab=6, seed=3, init_range=0.15)
    drafter = make_drafter(target, markov_rank=8, block_size=2, seed=5, std=0.3, w2_std=1.0)
    prompts = [[1, 4, 2], [3, 0, 5, 5, 1]]
    exact = [exact_joint(target, p, 3) for p in prompts]
    counts = [torch.zeros([6] * 3) for _ in prompts]
    batch = [prompts[j % 2] for j in range(8)]
    accepted = []
    for rep in range(300):
        out = generate(target, drafter, batch, 3, 1.0, (), gens(rep + 17, len(batch)))
        for j, r in enumerate(out):
            counts[j % 2][tuple(r.tokens)] += 1
            accepted += [x.accepted for x in r.rounds]
    assert 0.1 < sum(a > 0 for a in accepted) / len(accepted) < 0.9 and 2 in accepted
    for c, e in zip(counts, exact):
        assert c.sum() == 1200 and g_test_pvalue(c, e) > ALPHA
