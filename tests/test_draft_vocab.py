"""The draft vocabulary (model.draft_vocab_size) and the fully chunked head (loss.chunked_head)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from export_fixtures import MASK, V, save_target, tiny_target
from safetensors.torch import load_file

from deepspec.config import DrafterConfig
from deepspec.config.validate import ConfigError, validate
from deepspec.exporting.formats import FormatError
from deepspec.exporting.native import load_native, save_native
from deepspec.exporting.writer import drafter_outputs, export_drafter, load_export
from deepspec.losses import block_row_stats, reference_row_stats
from deepspec.losses.objective import dspark_loss
from deepspec.models.base import HeadFactors
from deepspec.models.config import resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter
from deepspec.models.vocab import (
    always_kept_ids,
    answer_token_counts,
    check_maps,
    maps_from_ids,
    select_draft_ids,
)


# ----------------------------------------------------------------------------- choosing the vocabulary
def test_selection_keeps_specials_and_most_frequent():
    examples = [
        SimpleNamespace(input_ids=[5, 5, 5, 7, 7, 9, 3], loss_mask=[0, 1, 1, 1, 1, 1, 0]),
        SimpleNamespace(input_ids=[3, 3, 3, 2, 7], loss_mask=[0, 0, 0, 1, 1]),
    ]
    counts = answer_token_counts(examples, 12)
    assert counts.tolist() == [0, 0, 1, 0, 0, 2, 0, 3, 0, 1, 0, 0]  # token 3 is never a label
    ids = select_draft_ids(counts, 4, keep=[11])
    assert ids.tolist() == [2, 5, 7, 11]  # 11 kept; 7, 5 by count; 2 beats 9 on the tie (lower id)
    with pytest.raises(ValueError, match=r"model.draft_vocab_size=1 is smaller than the 2 special"):
        select_draft_ids(counts, 1, keep=[10, 11])
    with pytest.raises(ValueError, match=r"model.draft_vocab_size=13 is outside \[1, 12\]"):
        select_draft_ids(counts, 13, keep=[])
    tok = SimpleNamespace(all_special_ids=[0, 1, 2], eos_token_id=1)
    assert always_kept_ids(tok, {"eos_token_id": [1, 4]}, mask_token_id=2) == [0, 1, 4]


def test_maps_follow_the_engine_convention():
    ids = torch.tensor([1, 4, 5, 9])
    d2t, t2d = maps_from_ids(ids, 10)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert (torch.arange(4) + d2t).tolist() == ids.tolist()  # target id = i + d2t[i] (an offset)
    assert t2d.nonzero().flatten().tolist() == ids.tolist()
    check_maps(d2t, t2d, 10)
    with pytest.raises(ValueError, match="maps a 10-token target vocabulary.*target has 12"):
        check_maps(d2t, t2d, 12)
    bad = t2d.clone()
    bad[0] = True
    with pytest.raises(ValueError, match="d2t and t2d disagree"):
        check_maps(d2t, bad, 10)


def test_config_rejects_bad_sizes():
    from omegaconf import OmegaConf

    from deepspec.config.schema import DeepSpecConfig

    cfg = OmegaConf.structured(DeepSpecConfig)
    cfg.model.draft_vocab_size = 5000  # the tiny target has 4096 tokens
    with pytest.raises(
        ConfigError, match=r"model.draft_vocab_size=5000 is larger.*target.tiny.vocab_size=4096"
    ):
        validate(cfg)
    cfg.model.draft_vocab_size = -1
    with pytest.raises(ConfigError, match="model.draft_vocab_size"):
        validate(cfg)
    cfg.model.draft_vocab_size = 1024
    validate(cfg)
    target = tiny_target(vocab=64)
    with pytest.raises(ValueError, match=r"model.draft_vocab_size=65 is larger.*vocab_size=64"):
        resolve_drafter_config(DrafterConfig(draft_vocab_size=65), target.config.to_dict(), mask_token_id=63)


# ----------------------------------------------------------------------------- the loss
def _case(n=40, d=24, v=64, h=16, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.sort(torch.randperm(v, generator=g)[:d]).values
    hid = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(d, h, generator=g)
    z = torch.randn(n, r, generator=g).requires_grad_()
    w2 = (torch.randn(d, r, generator=g) * 0.5).requires_grad_()
    tgt = torch.randn(n, v, generator=g) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:5] = ids[:5]  # some labels the draft vocabulary has, some it has not
    valid = (torch.rand(n, generator=g) > 0.2).float()
    return ids, hid, w, z, w2, tgt, labels, valid


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("soft", [False, True])
def test_pruned_lean_loss_matches_full_vocabulary_reference(soft):
    ids, hid, w, z, w2, tgt, labels, valid = _case()
    logits = (hid @ w.t() + z @ w2.t()).detach().requires_grad_()
    coef = torch.rand(3, 40, generator=torch.Generator().manual_seed(3))
    coef[1] *= float(soft)  # the soft-CE output carries no gradient when it is not computed

    def total(ce, sce, l1):
        return ((coef[0] * ce + coef[1] * sce + coef[2] * l1) * valid).sum()

    ref = reference_row_stats(logits, tgt, labels, with_soft_ce=soft, draft_ids=ids)
    lean = block_row_stats(logits, tgt, labels, valid, chunk_rows=7, with_soft_ce=soft, draft_ids=ids)
    for a, b in zip(ref, lean):
        torch.testing.assert_close(a * valid, b, rtol=1e-6, atol=1e-6)
    (g_ref,) = _grads(total(*ref), [logits])
    (g_lean,) = _grads(total(*lean), [logits])
    torch.testing.assert_close(g_ref * valid[:, None], g_lean, rtol=1e-5, atol=1e-6)
    # The definitions by hand: no CE for a label outside; L1 = L1 over the draft vocabulary + p's mass outside.
    inside = torch.isin(labels, ids)
    assert bool((lean[0][~inside] == 0).all()) and bool((lean[0][inside & (valid > 0)] > 0).all())
    q = torch.softmax(logits.detach(), -1)
    p = torch.softmax(tgt, -1)
    outside = torch.ones(64, dtype=torch.bool)
    outside[ids] = False
    l1 = (q - p[:, ids]).abs().sum(-1) + p[:, outside].sum(-1)
    torch.testing.assert_close(lean[2], l1 * valid, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("lazy_target", [False, True])
def test_chunked_head_matches_reference(pruned, lazy_target):
    from deepspec.losses import HeadLogits

    ids, hid, w, z, w2, tgt, labels, valid = _case(d=64 if not pruned else 24)
    ids = ids if pruned else None
    g = torch.Generator().manual_seed(9)
    th, tw = torch.randn(40, 16, generator=g), torch.randn(64, 16, generator=g)
    tgt = HeadLogits(th, tw) if lazy_target else th @ tw.t()
    coef = torch.rand(3, 40, generator=g)

    def total(ce, sce, l1):
        return ((coef[0] * ce + coef[1] * sce + coef[2] * l1) * valid).sum()

    params = [hid, z, w2]
    ref = reference_row_stats(hid @ w.t() + z @ w2.t(), tgt, labels, with_soft_ce=True, draft_ids=ids)
    got = block_row_stats(HeadFactors(hid, w, z, w2), tgt, labels, valid, 6, with_soft_ce=True, draft_ids=ids)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a * valid, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(total(*ref), params), _grads(total(*got), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_head_without_markov_and_auto_chunks():
    ids, hid, w, z, w2, tgt, labels, valid = _case(d=64, n=300)
    ref = reference_row_stats(hid @ w.t(), tgt, labels)
    got = block_row_stats(HeadFactors(hid, w), tgt, labels, None, 0)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (g1,) = _grads(ref[0].sum() + ref[2].sum(), [hid])
    (g2,) = _grads(got[0].sum() + got[2].sum(), [hid])
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the drafter
def pruned_drafter(target, d=40, seed=0, markov="vanilla", kind="dspark"):
    dc = DrafterConfig(
        kind=kind,
        num_layers=1,
        block_size=4,
        markov_rank=16 if kind == "dspark" else 0,
        markov_head_type=markov,
        num_target_features=3,
        draft_vocab_size=d,
    )
    cfg = resolve_drafter_config(dc, target.config.to_dict(), mask_token_id=MASK)
    m = ParallelDrafter(cfg)
    m.init_weights(std=0.1, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    m.set_draft_vocab(torch.sort(torch.randperm(V - 1, generator=g)[:d]).values)
    m.load_target_head(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    if m.markov_head is not None:
        with torch.no_grad():
            m.markov_head.markov_w2.weight.normal_(0, 0.1, generator=g)
    return m.eval()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    t = tiny_target()
    return t, save_target(t, tmp_path_factory.mktemp("qwen"))


def test_pruned_drafter_shapes_and_loss_paths(qwen):
    target, _ = qwen
    m = pruned_drafter(target).train()
    ids = m.draft_ids()
    assert m.lm_head.weight.shape == (40, 32) and m.markov_head.markov_w2.weight.shape == (40, 16)
    assert m.markov_head.markov_w1.weight.shape[0] == V and m.embed_tokens.weight.shape[0] == V
    assert torch.equal(m.lm_head.weight, target.get_output_embeddings().weight[ids])
    sd = m.state_dict()
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool and sd["t2d"].numel() == V
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 20, 3 * 32, generator=g)
    input_ids = torch.randint(0, V - 1, (2, 20), generator=g)
    anchors = torch.tensor([[2, 7, 11], [0, 5, 14]])
    prev = torch.randint(0, V - 1, (2, 3, 4), generator=g)
    out = m(feats, input_ids, anchors, prev)
    assert out.logits.shape == (2, 3, 4, 40)
    fac = m(feats, input_ids, anchors, prev, chunked_head=True)
    assert isinstance(fac.logits, HeadFactors)
    from deepspec.data.anchors import BlockTargets

    tgt = torch.randn(2, 3, 4, V, generator=g)
    labels = torch.randint(0, V, (2, 3, 4), generator=g)
    targets = BlockTargets(labels=labels, valid=torch.ones(2, 3, 4), prev_tokens=prev, target_pos=anchors)
    cfgs = [SimpleNamespace(ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0, decay_gamma=4.0, impl=i,
                            greedy_confidence_weight=1.0)
            for i in ("reference", "lean")]  # fmt: skip
    losses = [
        dspark_loss(
            out.logits, out.confidence_logits, tgt, targets, c, 10.0, draft_ids=ids,
            greedy_confidence_logits=out.greedy_confidence_logits,
        )
        for c in cfgs
    ]  # fmt: skip
    losses.append(
        dspark_loss(
            fac.logits, fac.confidence_logits, tgt, targets, cfgs[1], 10.0, draft_ids=ids,
            greedy_confidence_logits=fac.greedy_confidence_logits,
        )
    )  # fmt: skip
    # The greedy event compares the drafter's argmax, in target ids, with the target's.
    agree = (ids[out.logits.argmax(-1)] == tgt.argmax(-1)).float()
    assert all(torch.equal(lo.sums["greedy_accept_k"], agree.sum(dim=(0, 1))) for lo in losses)
    grads = [torch.autograd.grad(lo.loss, m.trainable_parameters(), retain_graph=True) for lo in losses]
    for lo, gr in zip(losses[1:], grads[1:]):
        torch.testing.assert_close(lo.loss, losses[0].loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(gr, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_pruned_draft_is_zero_outside_the_draft_vocabulary(qwen):
    target, _ = qwen
    m = pruned_drafter(target)
    feats = torch.randn(1, 9, 3 * 32)
    outside = ~m.t2d
    for temp in (0.0, 1.0):
        dr = m.draft(feats, 3, temp, generator=torch.Generator().manual_seed(1))
        assert dr.probs.shape == (4, V) and float(dr.probs[:, outside].abs().sum()) == 0.0
        assert bool(m.t2d[dr.tokens].all())
        torch.testing.assert_close(dr.probs.sum(-1), torch.ones(4))


# ----------------------------------------------------------------------------- exports
@pytest.mark.parametrize("fmt", ["native", "speculators"])
@pytest.mark.parametrize("embed", [True, False])
def test_exports_carry_the_maps(qwen, tmp_path, fmt, embed):
    from deepspec.exporting.check import check_export

    target, tdir = qwen
    m = pruned_drafter(target)
    out = export_drafter(m, tmp_path / "x", fmt, "bfloat16", include_embeddings=embed)
    rep = check_export(out, target=tdir, reference=m)
    assert rep.ok, rep.render()
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["d2t"].dtype == torch.int64 and torch.equal(tensors["d2t"], m.d2t)
    assert tensors["t2d"].dtype == torch.bool and torch.equal(tensors["t2d"], m.t2d)
    assert tensors["lm_head.weight"].shape == (40, 32)  # pruned rows: always written
    assert ("embed_tokens.weight" in tensors) == embed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 40
    emb, head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    loaded = load_export(out, target_embed=emb, target_lm_head=head)
    assert loaded.config.draft_vocab_size == 40 and torch.equal(loaded.d2t, m.d2t)
    got, _ = drafter_outputs(loaded)
    ref, _ = drafter_outputs(m)
    assert (got - ref).abs().max() < 2e-2 * (1 + ref.abs().max())
    with pytest.raises(Exception, match="draft vocabulary maps a 128-token target vocabulary.*64 rows"):
        load_export(out, target_embed=torch.zeros(64, 32), target_lm_head=torch.zeros(64, 32))


def test_dflash_format_refuses_a_draft_vocabulary(qwen, tmp_path):
    target, _ = qwen
    m = pruned_drafter(target, kind="dflash")
    with pytest.raises(FormatError, match="dflash cannot carry a draft vocabulary"):
        export_drafter(m, tmp_path / "x", "dflash")
    assert not (tmp_path / "x").exists()


def test_native_round_trip_and_mismatched_maps(qwen, tmp_path):
    target, _ = qwen
    m = pruned_drafter(target)
    out = save_native(m, tmp_path / "n", "float32")
    back = load_native(out)
    assert torch.equal(back.d2t, m.d2t) and torch.equal(back.lm_head.weight, m.lm_head.weight)
    assert (
        back.config.draft_vocab_size == 40
        and json.loads((out / "config.json").read_text())["vocab_size"] == V
    )
    from deepspec.atomic import write_tensors

    bad = load_file(str(out / "model.safetensors"))
    bad["t2d"] = torch.zeros(V, dtype=torch.bool)  # maps that no longer agree
    write_tensors(out / "model.safetensors", bad)
    with pytest.raises(ValueError, match="d2t and t2d disagree"):
        load_native(out)


# ----------------------------------------------------------------------------- lossless, end to end
@pytest.mark.slow
def test_t1_lossless_with_a_draft_vocabulary():
    from test_spec_decode import ALPHA, LAYER_IDS, exact_joint, g_test_pvalue, make_target, sample_counts

    target = make_target(vocab=6, seed=3, init_range=0.15)
    tc = target.config.to_dict()
    dc = DrafterConfig(
        num_layers=1, block_size=2, target_layer_ids=LAYER_IDS, markov_rank=8, draft_vocab_size=3
    )
    m = ParallelDrafter(resolve_drafter_config(dc, tc, mask_token_id=5))
    m.init_weights(std=0.3, seed=5)
    m.set_draft_vocab(torch.tensor([0, 2, 3]))
    m.load_target_head(target.embed_tokens.weight, target.lm_head.weight)
    with torch.no_grad():
        m.markov_head.markov_w2.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(105))
    m.eval()
    prompt = [1, 4, 2]
    counts, rounds = sample_counts(target, m, prompt, 3, 3000, seed=21)
    acc = [r.accepted for r in rounds]
    assert 0.1 < sum(a > 0 for a in acc) / len(acc) < 0.9 and 2 in acc
    assert g_test_pvalue(counts, exact_joint(target, prompt, 3)) > ALPHA


@pytest.mark.slow
def test_training_with_a_draft_vocabulary_end_to_end(tmp_path, tiny_cache):
    from train_fixtures import micro_overrides, train_here

    base = micro_overrides(tiny_cache, tmp_path / "run")
    with pytest.raises(ValueError, match=r"model.draft_vocab_size=2 is smaller than the \d+ special tokens"):
        train_here(base + ["model.draft_vocab_size=2", "train.max_steps=1"])
    extra = ["model.draft_vocab_size=256", "loss.chunked_head=true", "train.max_steps=3"]
    extra += [
        "eval.enabled=true",
        "eval.num_prompts=2",
        "eval.max_new_tokens=12",
        "export.format=speculators",
    ]
    run = train_here(base + extra)
    tensors = load_file(str(run / "drafter" / "model.safetensors"))
    assert tensors["lm_head.weight"].shape[0] == 256 and tensors["t2d"].numel() == 1024
    kept = (torch.arange(256) + tensors["d2t"]).tolist()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(next(tiny_cache.glob("tiny-target-*"))))
    assert tok.eos_token_id in kept  # decoding's stop token is always draftable
    report = json.loads((run / "eval.json").read_text())
    assert report["temperatures"]["0.0"]["identical_outputs"] == report["num_prompts"] == 2
    spec = json.loads((run / "export" / "speculators" / "config.json").read_text())
    assert spec["draft_vocab_size"] == 256


def test_chunked_head_refused_where_the_drafter_is_sharded(tmp_path):
    from train_fixtures import compose

    from deepspec.training.loop import preflight

    cfg = compose([f"train.output_dir={tmp_path / 'run'}", "train.strategy=fsdp", "loss.chunked_head=true"])
    with pytest.raises(ValueError, match="loss.chunked_head=true is not supported with train.strategy=fsdp"):
        preflight(cfg)
    assert not (tmp_path / "run").exists()
