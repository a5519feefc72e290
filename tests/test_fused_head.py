"""The chunked head with its gradients formed in the loss's forward (loss.chunked_head): loss, logged
sums and gradients equal the literal full-vocabulary reference and a literal draft-vocabulary one, at
full and pruned vocabularies, with and without the Markov head, under the validity mask; the
backward never recomputes a chunk for the training objective, and does (correctly) for any other use."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_target

import deepspec.losses.chunked_head as ch
from deepspec.config import DrafterConfig, LossConfig
from deepspec.data.anchors import BlockTargets, block_targets
from deepspec.losses import HeadLogits, block_row_stats, dspark_loss, reference_row_stats, target_logits
from deepspec.losses.objective import weighted_valid
from deepspec.models.base import HeadFactors
from deepspec.models.config import resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter

B, A, G, V, H, R = 2, 3, 4, 96, 16, 8
MIX = dict(soft_ce_weight=0.3)  # every term: CE, L1, confidence BCE and soft CE


def _inputs(pruned: bool, markov: bool, lazy: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = 40 if pruned else V
    ids = torch.sort(torch.randperm(V, generator=g)[:d]).values if pruned else None
    h = torch.randn(B, A, G, H, generator=g).requires_grad_()
    w = torch.randn(d, H, generator=g) * 0.7
    z = torch.randn(B, A, G, R, generator=g).requires_grad_() if markov else None
    w2 = (torch.randn(d, R, generator=g) * 0.5).requires_grad_() if markov else None
    th, tw = torch.randn(B, A, G, H, generator=g), torch.randn(V, H, generator=g) * 0.7
    tgt = HeadLogits(th, tw) if lazy else th @ tw.t()
    labels = torch.randint(0, V, (B, A, G), generator=g)
    if pruned:
        labels[0, 0] = ids[:G]  # some labels the draft vocabulary has, most it has not
    lengths = torch.tensor([[4, 2, 0], [3, 4, 1]])  # valid prefixes; one block without any
    valid = (torch.arange(G)[None, None, :] < lengths[..., None]).float()
    conf = torch.randn(B, A, G, generator=g).requires_grad_()
    targets = BlockTargets(labels=labels, valid=valid, prev_tokens=labels, target_pos=labels)
    return ids, h, w, z, w2, tgt, targets, conf


def _literal_draft_vocab_terms(logits, tgt, labels, ids):
    """The terms over the draft vocabulary, by hand: q over d tokens, p of the target at those tokens,
    the target's mass outside them added to L1, CE only for labels q can give."""
    logq = torch.log_softmax(logits, -1)
    p = torch.softmax(tgt, -1)
    p_in = p[..., ids]
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids] = False
    t2d = torch.full((V,), -1, dtype=torch.long)
    t2d[ids] = torch.arange(ids.numel())
    y = t2d[labels]
    ce = -torch.gather(logq, -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y >= 0)
    sce = -(p_in * logq).sum(-1)
    l1 = (logq.exp() - p_in).abs().sum(-1) + p[..., outside].sum(-1)
    return ce, sce, l1


def _params(h, z, w2, conf):
    return [t for t in (h, z, w2, conf) if t is not None]


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("markov", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_fused_head_matches_references(pruned, markov, lazy, monkeypatch):
    ids, h, w, z, w2, tgt, targets, conf = _inputs(pruned, markov, lazy)
    denom = weighted_valid(targets.valid, 4.0).sum() * 1.3  # a "global" denominator
    logits = h @ w.t() + (z @ w2.t() if markov else 0)
    ref = dspark_loss(logits, conf, tgt, targets, LossConfig(impl="reference", **MIX), denom, draft_ids=ids)
    ref_g = torch.autograd.grad(ref.loss, _params(h, z, w2, conf), retain_graph=True)

    def no_recompute(*a, **k):
        raise AssertionError("the training objective must not recompute the chunks in backward")

    monkeypatch.setattr(ch, "_recompute_grads", no_recompute)
    cfg = LossConfig(impl="lean", chunk_size=5, **MIX)  # 5 does not divide the 17 valid rows
    got = dspark_loss(HeadFactors(h, w, z, w2), conf, tgt, targets, cfg, denom, draft_ids=ids)
    got_g = torch.autograd.grad(got.loss, _params(h, z, w2, conf))
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    for k in ref.sums:
        torch.testing.assert_close(got.sums[k], ref.sums[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got_g[0][targets.valid == 0].abs().max() == 0  # rows without weight: exactly no gradient
    if pruned:  # the literal draft-vocabulary version gives the same loss and gradients
        t = tgt.materialize() if lazy else tgt
        ce, sce, l1 = _literal_draft_vocab_terms(logits, t, targets.labels, ids)
        wv = weighted_valid(targets.valid, 4.0)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            conf, (1 - 0.5 * l1).detach().clamp(0, 1), reduction="none"
        )
        hand = (wv * (0.1 * ce + 0.9 * l1 + 0.3 * sce + bce)).sum() / denom
        torch.testing.assert_close(got.loss, hand, rtol=1e-6, atol=1e-7)
        for a, b in zip(got_g, torch.autograd.grad(hand, _params(h, z, w2, conf))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pruned", [False, True])
def test_other_uses_of_the_terms_recompute_correctly(pruned, monkeypatch):
    """Per-row gradients that are not a multiple of the given weights (here a squared CE) take the
    recomputing backward, which gives the gradients of what was actually backpropagated."""
    ids, h, w, z, w2, tgt, targets, _ = _inputs(pruned, True, True, seed=1)
    valid = targets.valid
    calls = []
    orig = ch._recompute_grads
    monkeypatch.setattr(ch, "_recompute_grads", lambda *a: calls.append(1) or orig(*a))
    weights = torch.stack([valid, 0.5 * valid, 2.0 * valid])
    got = block_row_stats(HeadFactors(h, w, z, w2), tgt, targets.labels, valid, 4, True, ids, weights)
    ref = reference_row_stats(h @ w.t() + z @ w2.t(), tgt, targets.labels, with_soft_ce=True, draft_ids=ids)

    def loss(ce, sce, l1):
        return ((ce**2 + 0.5 * sce + 2.0 * l1) * valid).sum()

    got_g = torch.autograd.grad(loss(*got), [h, z, w2])
    ref_g = torch.autograd.grad(loss(*ref), [h, z, w2])
    assert calls == [1]
    for a, b in zip(got_g, ref_g):  # 2·ce·dce: fp32 rounding of ce is amplified
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_second_backward_and_no_grad():
    ids, h, w, z, w2, tgt, targets, conf = _inputs(True, True, True, seed=2)
    cfg, denom = LossConfig(**MIX), 7.0
    out = dspark_loss(HeadFactors(h, w, z, w2), conf, tgt, targets, cfg, denom, draft_ids=ids)
    first = torch.autograd.grad(out.loss, [h, z, w2], retain_graph=True)  # scales the forward's grads
    second = torch.autograd.grad(out.loss, [h, z, w2])  # they are used up: recomputed
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: no gradient is formed, the values are the same
        ev = dspark_loss(HeadFactors(h, w, z, w2), conf, tgt, targets, cfg, denom, draft_ids=ids)
    assert float(ev.loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)


def _drafter(vocab: int, d: int, seed: int = 0):
    t = tiny_target(vocab=vocab)
    c = resolve_drafter_config(
        DrafterConfig(num_layers=1, block_size=4, markov_rank=8, draft_vocab_size=d),
        t.config.to_dict(),
        mask_token_id=vocab - 1,
    )
    m = ParallelDrafter(c)
    m.init_weights(std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if d:
        m.set_draft_vocab(torch.sort(torch.randperm(vocab - 1, generator=g)[:d]).values)
    m.load_target_head(t.get_input_embeddings().weight, t.get_output_embeddings().weight)
    with torch.no_grad():
        m.markov_head.markov_w2.weight.normal_(0, 0.3, generator=g)
    return t, m.train()


@pytest.mark.parametrize("d", [0, 48])
def test_whole_drafter_parameter_grads(d):
    """Through a real DSpark drafter (Markov and confidence heads), lazy target logits, a loss mask
    and a padded anchor: every parameter gradient of the fused head equals the literal reference's
    and the lean loss's on materialised logits."""
    from deepspec.target.adapter import TargetModel

    t, m = _drafter(V, d)
    ids = torch.randint(0, V - 1, (2, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    mask[1, 12:] = 0
    anchors = torch.tensor([[3, 6, 12], [4, 9, 13]])
    tm = TargetModel(t, m.config.target_layer_ids)
    feats = tm(ids)
    tg = block_targets(ids, mask, anchors, torch.tensor([[1, 1, 1], [1, 1, 0]]), 4)
    denom = weighted_valid(tg.valid, 4.0).sum()
    grads = {}
    for name, impl, chunked, lazy in (
        ("reference", "reference", False, False),
        ("lean", "lean", False, True),
        ("fused", "lean", True, True),
    ):
        m.zero_grad()
        out = m(feats.aux, ids, anchors, tg.prev_tokens, chunked_head=chunked)
        assert isinstance(out.logits, HeadFactors) == chunked
        tgt = target_logits(feats.final, tg.target_pos, tm.lm_head, lazy=lazy)
        cfg = LossConfig(impl=impl, chunk_size=3)
        dspark_loss(
            out.logits, out.confidence_logits, tgt, tg, cfg, denom, draft_ids=m.draft_ids()
        ).loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert len(grads["fused"]) > 10 and grads["fused"].keys() == grads["reference"].keys()
    assert float(grads["fused"]["markov_head.markov_w2.weight"].abs().max()) > 0
    for other in ("reference", "lean"):
        for n, g in grads["fused"].items():
            torch.testing.assert_close(
                g, grads[other][n], rtol=1e-4, atol=1e-6, msg=lambda msg: f"{n}: {msg}"
            )


def test_bf16_autocast():
    """Under bf16 autocast the head's matmuls run in bf16: the gradients formed in the forward equal
    the recomputing backward's (the same bf16 products), and stay near the fp32 reference."""
    ids, h, w, z, w2, tgt, targets, conf = _inputs(True, True, True, seed=3)
    denom = weighted_valid(targets.valid, 4.0).sum()
    res = {}
    for name in ("fused", "recompute", "fp32"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            ce, sce, l1 = block_row_stats(
                HeadFactors(h, w, z, w2), tgt, targets.labels, targets.valid, 5, True, ids,
                None if name == "recompute" else torch.stack([0.1 * targets.valid, 0.3 * targets.valid, 0.9 * targets.valid]),
            )  # fmt: skip
        loss = ((0.1 * ce + 0.3 * sce + 0.9 * l1) * targets.valid).sum() / denom
        res[name] = (loss.detach(), torch.autograd.grad(loss, [h, z, w2]))
    assert all(g.dtype == torch.float32 for g in res["fused"][1])
    torch.testing.assert_close(res["fused"][0], res["recompute"][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(res["fused"][1], res["recompute"][1]):  # bf16 products; scaled before or after them
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * float(b.abs().max()))
    torch.testing.assert_close(res["fused"][0], res["fp32"][0], rtol=2e-2, atol=1e-3)
    for a, b in zip(res["fused"][1], res["fp32"][1]):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("pruned", [False, True])
def test_greedy_event_taken_in_the_same_pass(pruned, monkeypatch):
    """The greedy confidence output's target (draft argmax == target argmax) comes out of the chunked
    head's own pass: no further pass over the logits, the same loss, sums and gradients."""
    import deepspec.losses.agreement as agreement

    ids, h, w, z, w2, tgt, targets, conf = _inputs(pruned, True, False, seed=5)
    greedy_conf = torch.randn(B, A, G, generator=torch.Generator().manual_seed(6)).requires_grad_()
    denom = weighted_valid(targets.valid, 4.0).sum()
    logits = h @ w.t() + z @ w2.t()
    with torch.no_grad():  # two blocks where the target agrees with the drafter's argmax
        agree = torch.full((2, G, V), -30.0).index_copy(-1, ids, logits[0, :2]) if pruned else logits[0, :2]
        tgt[0, :2] = 1.5 * agree
    args = (targets, LossConfig(impl="reference", **MIX), denom)
    ref = dspark_loss(logits, conf, tgt, *args, draft_ids=ids, greedy_confidence_logits=greedy_conf)
    ref_g = torch.autograd.grad(ref.loss, [h, z, w2, conf, greedy_conf])
    assert 0 < float(ref.sums["greedy_accept_k"].sum()) < float(targets.valid.sum())  # both outcomes occur
    orig = agreement.row_argmax

    def only_tensors(x):
        assert isinstance(x, torch.Tensor), "the chunked head should have taken this argmax"
        return orig(x)

    monkeypatch.setattr(agreement, "row_argmax", only_tensors)
    cfg = LossConfig(impl="lean", chunk_size=5, **MIX)
    got = dspark_loss(HeadFactors(h, w, z, w2), conf, tgt, targets, cfg, denom, ids, greedy_conf)
    got_g = torch.autograd.grad(got.loss, [h, z, w2, conf, greedy_conf])
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    for k in ref.sums:
        torch.testing.assert_close(got.sums[k], ref.sums[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for a, b in zip(got_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
