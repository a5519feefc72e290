"""The lean (chunked, recomputed-in-backward) loss equals the literal full-vocabulary one: values,
logged sums and gradients, for every loss mix (DSpark, DFlash, EAGLE-3), with masks, with chunk
sizes that do not divide the number of rows, and through a real drafter's parameters."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_target

from deepspec.config import LossConfig
from deepspec.data.anchors import BlockTargets
from deepspec.losses import dspark_loss, target_logits, weighted_valid
from deepspec.losses.vocab_terms import HeadLogits, auto_chunk_rows, block_row_stats, reference_row_stats

B, A, G, V = 2, 3, 5, 97


MIXES = {
    "dspark": dict(),
    "dflash": dict(ce_weight=1.0, l1_weight=0.0, confidence_weight=0.0),
    "eagle3": dict(
        ce_weight=0.0,
        l1_weight=0.0,
        confidence_weight=0.0,
        soft_ce_weight=1.0,
        decay_gamma=1.0 / math.log(1.25),
    ),
    "all_terms": dict(soft_ce_weight=0.5),
}


def make_inputs(seed: int, masked: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, A, G, V, generator=g) * 3).to(dtype)
    tgt = (torch.randn(B, A, G, V, generator=g) * 3).to(dtype)
    # Slots where draft == target exactly: |q - p| has zeros (sign(0) in the L1 gradient).
    tgt[0, 0, 1] = logits[0, 0, 1]
    tgt[1, 2, 0] = logits[1, 2, 0]
    labels = torch.randint(0, V, (B, A, G), generator=g)
    if masked:  # contiguous valid prefixes of different lengths, one block fully invalid (a padded anchor)
        lengths = torch.tensor([[5, 2, 0], [3, 5, 1]])
        valid = (torch.arange(G)[None, None, :] < lengths[..., None]).float()
    else:
        valid = torch.ones(B, A, G)
    labels = torch.where(valid.bool(), labels, torch.zeros_like(labels))
    conf = torch.randn(B, A, G, generator=g)
    targets = BlockTargets(labels=labels, valid=valid, prev_tokens=labels, target_pos=labels)
    return logits, tgt, conf, targets


def run(impl: str, mix: str, chunk: int, logits, tgt, conf, targets):
    cfg = LossConfig(impl=impl, chunk_size=chunk, **MIXES[mix])
    z = logits.clone().requires_grad_(True)
    c = conf.clone().requires_grad_(True) if mix in ("dspark", "all_terms") else None
    denom = weighted_valid(targets.valid, cfg.decay_gamma).sum() * 1.7  # a "global" denominator
    out = dspark_loss(z, c, tgt, targets, cfg, denom)
    out.loss.backward()
    return out, z.grad, (c.grad if c is not None else None)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1000, 0])  # 4 and 7 do not divide B·A·G = 30; 0 = auto
def test_lean_equals_reference(mix, masked, chunk):
    logits, tgt, conf, targets = make_inputs(seed=chunk + 10 * masked, masked=masked)
    ref, gz_ref, gc_ref = run("reference", mix, chunk, logits, tgt, conf, targets)
    got, gz, gc = run("lean", mix, chunk, logits, tgt, conf, targets)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=1e-5)
    for k in ref.sums:
        torch.testing.assert_close(got.sums[k], ref.sums[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
    assert gz.dtype == logits.dtype and gz.shape == logits.shape
    torch.testing.assert_close(gz, gz_ref, atol=1e-7, rtol=1e-5)
    if gc_ref is not None:
        torch.testing.assert_close(gc, gc_ref, atol=1e-7, rtol=1e-5)
    if masked:  # rows without weight get exactly zero gradient
        assert gz[targets.valid == 0].abs().max() == 0


def test_row_stats_values_and_skipped_rows():
    logits, tgt, _, targets = make_inputs(seed=3, masked=True)
    ce, sce, l1 = block_row_stats(logits, tgt, targets.labels, targets.valid, chunk_rows=4, with_soft_ce=True)
    rce, rsce, rl1 = reference_row_stats(logits, tgt, targets.labels, with_soft_ce=True)
    v = targets.valid.bool()
    for a, b in ((ce, rce), (sce, rsce), (l1, rl1)):
        torch.testing.assert_close(a[v], b[v], atol=1e-5, rtol=1e-5)
        assert (a[~v] == 0).all()
    assert l1[0, 0, 1] < 1e-6 and (l1 >= 0).all() and (l1 <= 2 + 1e-6).all()
    # Soft CE >= entropy of p, with equality where q == p: check the q == p slot.
    p = torch.softmax(tgt[0, 0, 1], -1)
    torch.testing.assert_close(sce[0, 0, 1], -(p * p.log()).sum(), atol=1e-5, rtol=1e-5)


def test_bf16_logits():
    logits, tgt, conf, targets = make_inputs(seed=5, masked=True, dtype=torch.bfloat16)
    ref, gz_ref, gc_ref = run("reference", "dspark", 3, logits, tgt, conf, targets)
    got, gz, gc = run("lean", "dspark", 3, logits, tgt, conf, targets)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=1e-5)
    assert gz.dtype == torch.bfloat16
    torch.testing.assert_close(gz.float(), gz_ref.float(), atol=1e-4, rtol=1e-2)
    torch.testing.assert_close(gc, gc_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
def test_lazy_target_logits(autocast):
    """Target logits given as (final hidden, lm_head): computed per chunk, same loss and gradients."""
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(16, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, 16, generator=g))
    final = torch.randn(B, 12, 16, generator=g)
    pos = torch.randint(0, 12, (B, A, G), generator=g)
    logits, _, conf, targets = make_inputs(seed=8, masked=True)
    targets = BlockTargets(targets.labels, targets.valid, targets.prev_tokens, pos)
    res = {}
    for lazy, impl in ((False, "reference"), (True, "lean"), (True, "reference")):
        z = logits.clone().requires_grad_(True)
        c = conf.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            tgt = target_logits(final, pos, head, lazy=lazy)
            assert isinstance(tgt, HeadLogits) == lazy and tuple(tgt.shape) == (B, A, G, V)
            out = dspark_loss(
                z,
                c,
                tgt,
                targets,
                LossConfig(impl=impl, chunk_size=4, soft_ce_weight=0.3),
                weighted_valid(targets.valid, 4.0).sum(),
            )
        out.loss.backward()
        res[(lazy, impl)] = (out.loss.detach(), z.grad, c.grad)
    ref = res[(False, "reference")]
    for key in ((True, "lean"), (True, "reference")):
        for a, b in zip(res[key], ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_auto_chunk_rows():
    assert auto_chunk_rows(151936) == 3 and auto_chunk_rows(151936, device="cuda") == 220
    assert auto_chunk_rows(100, 7) == 7
    assert auto_chunk_rows(10**9) == 1


def test_drafter_parameter_grads_equal():
    """Through a real DSpark drafter: parameter gradients of lean vs reference agree."""

    from deepspec.config import DrafterConfig
    from deepspec.data.anchors import block_targets
    from deepspec.losses import target_logits
    from deepspec.models import build_drafter
    from deepspec.models.config import resolve_drafter_config
    from deepspec.target.adapter import TargetModel

    t = tiny_target(vocab=V)
    c = resolve_drafter_config(
        DrafterConfig(num_layers=1, block_size=4, markov_rank=8), t.config.to_dict(), mask_token_id=V - 1
    )
    d = build_drafter(c)
    d.init_weights(std=0.1, seed=0)
    with torch.no_grad():
        d.markov_head.markov_w2.weight.normal_(0, 0.3)
    d.load_target_head(t.get_input_embeddings().weight, t.get_output_embeddings().weight)
    ids = torch.randint(0, V - 1, (2, 16))
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    anchors = torch.tensor([[3, 6, 12], [4, 9, 13]])
    tm = TargetModel(t, c.target_layer_ids)
    feats = tm(ids)
    tg = block_targets(ids, mask, anchors, torch.ones_like(anchors), 4)
    tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
    grads = {}
    for impl in ("reference", "lean"):
        d.zero_grad()
        cfg = LossConfig(impl=impl, chunk_size=5)
        out = d(feats.aux, ids, anchors, tg.prev_tokens)
        dspark_loss(
            out.logits, out.confidence_logits, tgt, tg, cfg, weighted_valid(tg.valid, 4.0).sum()
        ).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}
    assert grads["lean"].keys() == grads["reference"].keys() and len(grads["lean"]) > 10
    for n in grads["lean"]:
        torch.testing.assert_close(
            grads["lean"][n], grads["reference"][n], atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}"
        )


def test_lean_is_as_accurate_as_reference_against_float64():
    """On a large vocabulary both differ from a float64 computation only by fp32 rounding, and the
    lean gradients are no further from it than the literal version's."""
    v, n = 20000, 12
    g = torch.Generator().manual_seed(11)
    z = torch.randn(n, v, generator=g) * 3
    t = torch.randn(n, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    w = torch.rand(3, n, generator=g)

    def grads(fn, dtype):
        zz = z.to(dtype).clone().requires_grad_(True)
        ce, sce, l1 = fn(zz, t.to(dtype), y)
        ((w[0] * ce).sum() + (w[1] * sce).sum() + (w[2] * l1).sum()).backward()
        return zz.grad.double()

    def exact(zz, tt, yy):
        logq = torch.log_softmax(zz, -1)
        p = torch.softmax(tt, -1)
        return -logq.gather(1, yy[:, None])[:, 0], -(p * logq).sum(-1), (logq.exp() - p).abs().sum(-1)

    g64 = grads(exact, torch.float64)
    ref = grads(lambda a, b, c: reference_row_stats(a, b, c, with_soft_ce=True), torch.float32)
    lean = grads(lambda a, b, c: block_row_stats(a, b, c, chunk_rows=5, with_soft_ce=True), torch.float32)
    scale = g64.abs().max()
    err_ref = float((ref - g64).abs().max() / scale)
    err_lean = float((lean - g64).abs().max() / scale)
    assert err_ref < 1e-4 and err_lean <= 1.5 * err_ref + 1e-7, (err_lean, err_ref)
