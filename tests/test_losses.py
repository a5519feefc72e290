"""DSpark loss against a slow per-slot reference, split-independent normalisation, anchors and block labels."""

from __future__ import annotations

import math
from functools import partial

import pytest
import tiny_models
import torch

from deepspec.config import LossConfig
from deepspec.data.anchors import anchor_candidates, block_targets, sample_anchors, slot_weights
from deepspec.data.batching import Example, collate
from deepspec.losses import dspark_loss, target_logits, weighted_valid
from deepspec.target.adapter import TargetModel

V = 80
MASK = V - 1
PAD = 0
G = 4  # block size


tiny_target = partial(tiny_models.tiny_target, layers=5, vocab=V)
tiny_drafter = partial(tiny_models.tiny_drafter, mask=MASK, num_layers=1, block_size=G, rank=8, w2_scale=0.5)


def examples():
    """Sequences of different lengths (so the batch is padded) whose loss masks have holes."""
    g = torch.Generator().manual_seed(0)

    def ex(mask):
        return Example(torch.randint(1, V - 1, (len(mask),), generator=g).tolist(), mask)

    return [
        ex([0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1]),  # holes inside the answer
        ex([0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # answer runs to the end (blocks cut by the end)
        ex([0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1]),  # many holes
        ex([0, 0, 0, 0, 1, 1, 1, 1, 1]),  # shortest: padding in a batch
    ]


def batch_of(exs, idx, num_anchors=5):
    return collate([exs[i] for i in idx], [(0, i) for i in idx], num_anchors, seed=3, pad_id=PAD)


# ----------------------------------------------------------------------------- 3. loss vs slow reference


def slow_reference_loss(
    draft_logits, conf_logits, hf_logits, batch, lengths, cfg: LossConfig, greedy_logits=None
):
    """Per anchor, per slot: CE, L1(q, p), c* = 1 - L1/2, BCE, and with ``greedy_logits`` the BCE against
    [argmax q = argmax p]; weights exp(-(k-1)/g); contiguous prefix."""
    total = draft_logits.new_zeros((), dtype=torch.float64)
    wsum = 0.0
    B, A = batch.anchors.shape
    for b in range(B):
        n = lengths[b]
        mask = batch.loss_mask[b].tolist()
        ids = batch.input_ids[b].tolist()
        for a in range(A):
            if not batch.anchor_valid[b, a]:
                continue
            p0 = int(batch.anchors[b, a])
            assert mask[p0] == 1 and mask[p0 + 1] == 1  # an anchor is a candidate
            for k in range(1, G + 1):
                pos = p0 + k
                if pos >= n or mask[pos] != 1:
                    break  # only a contiguous valid prefix of the block counts
                w = math.exp(-(k - 1) / cfg.decay_gamma)
                logq = torch.log_softmax(draft_logits[b, a, k - 1].double(), -1)
                p = torch.softmax(hf_logits[b, p0 + k - 1].double(), -1)
                ce = -logq[ids[pos]]
                l1 = (logq.exp() - p).abs().sum()
                term = cfg.ce_weight * ce + cfg.l1_weight * l1
                if conf_logits is not None:
                    cstar = (1.0 - 0.5 * l1).detach()
                    z = conf_logits[b, a, k - 1].double()
                    bce = -(
                        cstar * torch.nn.functional.logsigmoid(z)
                        + (1 - cstar) * torch.nn.functional.logsigmoid(-z)
                    )
                    term = term + cfg.confidence_weight * bce
                if greedy_logits is not None:
                    agree = float(int(draft_logits[b, a, k - 1].argmax()) == int(p.argmax()))
                    z = greedy_logits[b, a, k - 1].double()
                    bce = -(
                        agree * torch.nn.functional.logsigmoid(z)
                        + (1 - agree) * torch.nn.functional.logsigmoid(-z)
                    )
                    term = term + cfg.greedy_confidence_weight * bce
                total = total + w * term
                wsum += w
    return total / wsum, wsum


@pytest.mark.parametrize("kind,markov", [("dspark", "vanilla"), ("dspark", "rnn"), ("dflash", "vanilla")])
def test_batched_loss_equals_slow_reference(kind, markov):
    target = tiny_target()
    d = tiny_drafter(target, kind=kind, markov=markov)
    exs = examples()
    batch = batch_of(exs, [0, 1, 2, 3])
    lengths = [len(e.input_ids) for e in exs]
    assert batch.input_ids.shape == (4, 16) and (batch.loss_mask[3, 9:] == 0).all()
    assert batch.anchor_valid.sum() < batch.anchor_valid.numel()  # some padded anchors

    tm = TargetModel(target, d.config.target_layer_ids)
    feats = tm(batch.input_ids, attention_mask=batch.attention_mask)
    with torch.no_grad():
        hf_logits = target(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    tg = block_targets(batch.input_ids, batch.loss_mask, batch.anchors, batch.anchor_valid, G)
    tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
    # target_logits on the captured final state = the HF model's own logits at p0+k-1.
    idx = tg.target_pos.reshape(4, -1)
    ref_tgt = torch.gather(hf_logits, 1, idx[..., None].expand(-1, -1, V)).reshape(tgt.shape)
    torch.testing.assert_close(tgt, ref_tgt, atol=1e-5, rtol=1e-5)

    cfg = LossConfig()
    out = d(feats.aux, batch.input_ids, batch.anchors, tg.prev_tokens)
    if kind == "dflash":
        assert out.confidence_logits is None and d.markov_head is None
    denom = weighted_valid(tg.valid, cfg.decay_gamma).sum()
    if kind == "dspark":
        assert out.greedy_confidence_logits.shape == out.confidence_logits.shape
    got = dspark_loss(
        out.logits,
        out.confidence_logits,
        tgt,
        tg,
        cfg,
        denom,
        greedy_confidence_logits=out.greedy_confidence_logits,
    )
    ref, wsum = slow_reference_loss(
        out.logits, out.confidence_logits, hf_logits, batch, lengths, cfg, out.greedy_confidence_logits
    )

    # The contiguous-prefix rule matters here: a plain "label is masked" rule would weigh more slots.
    naive = 0.0
    w = slot_weights(G, cfg.decay_gamma)
    for b in range(4):
        for a in range(batch.anchors.shape[1]):
            if batch.anchor_valid[b, a]:
                for k in range(G):
                    pos = int(batch.anchors[b, a]) + k + 1
                    if pos < lengths[b] and batch.loss_mask[b, pos]:
                        naive += float(w[k])
    assert naive > wsum + 0.5

    assert float(got.sums["weight"]) == pytest.approx(wsum, rel=1e-6)
    assert float(denom) == pytest.approx(wsum, rel=1e-6)
    torch.testing.assert_close(got.loss.double(), ref, atol=1e-5, rtol=1e-5)
    # The logged sums recombine into the same loss.
    s = got.sums
    recomb = (
        cfg.ce_weight * s["ce"]
        + cfg.l1_weight * s["l1"]
        + cfg.confidence_weight * s["bce"]
        + cfg.greedy_confidence_weight * s.get("bce_greedy", 0.0)
    ) / s["weight"]
    torch.testing.assert_close(recomb.double(), ref, atol=1e-5, rtol=1e-5)

    params = d.trainable_parameters()
    g_got = torch.autograd.grad(got.loss, params, retain_graph=True)
    g_ref = torch.autograd.grad(ref, params)
    assert any(float(g.abs().max()) > 1e-4 for g in g_ref)
    for p_got, p_ref in zip(g_got, g_ref):
        torch.testing.assert_close(p_got.double(), p_ref.double(), atol=1e-6, rtol=1e-4)


def test_loss_is_zero_l1_when_draft_equals_target():
    """q = p gives L1 = 0 and c* = 1 at every valid slot."""
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    anchors = torch.tensor([[2, 6]])
    tg = block_targets(ids, mask, anchors, torch.ones_like(anchors), G)
    logits = torch.randn(1, 2, G, V, generator=torch.Generator().manual_seed(2))
    cfg = LossConfig(ce_weight=0.0, l1_weight=1.0, confidence_weight=1.0)
    big = torch.full((1, 2, G), 30.0)  # σ(30) ≈ 1: BCE against c* = 1 is ~0
    out = dspark_loss(logits, big, logits, tg, cfg, 1.0)
    assert float(out.sums["l1"]) < 1e-5
    assert float(out.loss) < 1e-4  # c* = 1 up to float noise in L1, σ(30) = 1 - 1e-13
    torch.testing.assert_close(out.sums["accept_k"], out.sums["valid_k"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- 4. split independence


def test_gradient_independent_of_micro_batch_split():
    target = tiny_target()
    d = tiny_drafter(target)
    exs = examples()
    tm = TargetModel(target, d.config.target_layer_ids)
    cfg = LossConfig()
    params = d.trainable_parameters()

    def parts(idx):
        b = batch_of(exs, idx)
        feats = tm(b.input_ids, attention_mask=b.attention_mask)
        tg = block_targets(b.input_ids, b.loss_mask, b.anchors, b.anchor_valid, G)
        return b, feats, tg

    full = parts([0, 1, 2, 3])
    micro = [parts([0, 1]), parts([2, 3])]
    denom_full = weighted_valid(full[2].valid, cfg.decay_gamma).sum()
    denom_split = sum(weighted_valid(m[2].valid, cfg.decay_gamma).sum() for m in micro)
    assert float(denom_split) == pytest.approx(float(denom_full), rel=1e-6)
    # Micro-batches carry different amounts of weight, so a per-micro-batch mean would differ.
    w0, w1 = (float(weighted_valid(m[2].valid, cfg.decay_gamma).sum()) for m in micro)
    assert abs(w0 - w1) > 0.5

    def loss_of(part, denom):
        b, feats, tg = part
        out = d(feats.aux, b.input_ids, b.anchors, tg.prev_tokens)
        tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
        return dspark_loss(
            out.logits,
            out.confidence_logits,
            tgt,
            tg,
            cfg,
            denom,
            greedy_confidence_logits=out.greedy_confidence_logits,
        ).loss

    loss_full = loss_of(full, denom_full)
    g_full = torch.autograd.grad(loss_full, params)
    losses = [loss_of(m, denom_split) for m in micro]
    g_parts = [torch.autograd.grad(loss, params) for loss in losses]
    torch.testing.assert_close(losses[0] + losses[1], loss_full, atol=1e-6, rtol=1e-5)
    assert any(float(g.abs().max()) > 1e-4 for g in g_full)
    for gf, ga, gb in zip(g_full, *g_parts):
        torch.testing.assert_close(ga + gb, gf, atol=1e-6, rtol=1e-4)

    # With per-micro-batch denominators (the wrong rule) the sum would not match.
    wrong = [loss_of(m, weighted_valid(m[2].valid, cfg.decay_gamma).sum()) for m in micro]
    assert abs(float((wrong[0] + wrong[1]).detach()) / 2 - float(loss_full.detach())) > 1e-4


# ----------------------------------------------------------------------------- 5. anchors and block labels


def test_anchor_candidates_rule():
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1])
    assert anchor_candidates(mask).tolist() == [1, 4, 5]  # p=8 is last: no p+1; p=2, p=6 followed by 0
    assert anchor_candidates(torch.tensor([1, 0, 1, 0])).tolist() == []
    assert anchor_candidates(torch.ones(5, dtype=torch.long)).tolist() == [0, 1, 2, 3]


def test_sample_anchors_without_replacement_and_seeded():
    mask = torch.zeros(200, dtype=torch.long)
    mask[10:60] = 1
    mask[80:150] = 1
    cand = set(anchor_candidates(mask).tolist())
    assert len(cand) == 49 + 69
    # Fewer candidates than num_anchors: all of them, sorted.
    assert sample_anchors(mask, 1000).tolist() == sorted(cand)
    seen = set()
    for seed in range(40):
        a = sample_anchors(mask, 16, torch.Generator().manual_seed(seed))
        assert a.numel() == 16
        assert len(set(a.tolist())) == 16  # without replacement
        assert set(a.tolist()) <= cand
        assert a.tolist() == sorted(a.tolist())
        b = sample_anchors(mask, 16, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)  # deterministic for a seeded generator
        seen |= set(a.tolist())
    # Different seeds differ, and the draws cover the candidates (uniform, not a fixed prefix).
    a0 = sample_anchors(mask, 16, torch.Generator().manual_seed(0))
    a1 = sample_anchors(mask, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(a0, a1)
    assert len(seen) > 0.9 * len(cand)
    assert min(seen) < 30 and max(seen) > 130


def test_block_targets_hand_made():
    ids = torch.arange(100, 110).view(1, 10)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1, 1, 1]])
    anchors = torch.tensor([[1, 5, 8, 0]])
    valid = torch.tensor([[1, 1, 1, 0]])
    t = block_targets(ids, mask, anchors, valid, 3)
    # anchor 1: labels at 2 (masked), 3 (hole), 4 (masked again, but after the hole) -> prefix of 1
    # anchor 5: labels 6, 7, 8 all masked
    # anchor 8: label 9, then past the end
    # padded anchor (valid 0): nothing
    assert t.valid.tolist() == [[[1, 0, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]]
    assert t.labels.tolist() == [[[102, 0, 0], [106, 107, 108], [109, 0, 0], [0, 0, 0]]]
    assert t.prev_tokens[0, :3].tolist() == [[101, 102, 103], [105, 106, 107], [108, 109, 109]]
    assert t.target_pos[0, :3].tolist() == [[1, 2, 3], [5, 6, 7], [8, 9, 9]]
    assert t.valid.dtype == torch.float32

    w = slot_weights(4, 4.0)
    torch.testing.assert_close(w, torch.exp(-torch.arange(4.0) / 4))
    assert slot_weights(3, 0.0).tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(
        weighted_valid(t.valid, 4.0).sum(), torch.tensor(1 + 1 + math.exp(-0.25) + math.exp(-0.5) + 1)
    )
