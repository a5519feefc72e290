"""DSpark drafter: visibility rule, sampling loop vs teacher forcing, target adapter, training, export.

Every target here is a tiny randomly initialised HF model (no download).
"""

from __future__ import annotations

import json
from functools import partial

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from deepspec.config import DrafterConfig, LossConfig
from deepspec.data.anchors import block_targets
from deepspec.exporting.native import load_native, save_native
from deepspec.losses import dspark_loss, target_logits, weighted_valid
from deepspec.models import DRAFTER_CLASSES, Drafter, Eagle3Drafter, build_drafter
from deepspec.models.config import KINDS, resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter, visibility_mask
from deepspec.target.adapter import TargetModel

V = 96
MASK = V - 1
H = 32

MARKOV_KINDS = ["vanilla", "gated", "rnn", "off"]


tiny_target = partial(tiny_models.tiny_target, vocab=V)
# W1 and W2 both random, so the Markov head changes the logits noticeably.
tiny_drafter = partial(tiny_models.tiny_drafter, mask=MASK, w1_scale=0.5, w2_scale=0.5)


def features(target, ids, layer_ids, attention_mask=None):
    return TargetModel(target, layer_ids)(ids, attention_mask=attention_mask)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- 1. visibility


def test_visibility_mask_small_case():
    anchors = torch.tensor([[2, 4]])
    m = visibility_mask(anchors, ctx_len=6, block_size=2)
    assert m.shape == (1, 1, 4, 10) and m.dtype == torch.bool
    expected = torch.tensor(
        [
            # context 0..5        | block keys (block 0: 2, block 1: 2)
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # block 0 (p0=2), slot 1
            [1, 1, 0, 0, 0, 0, 1, 1, 0, 0],  # block 0, slot 2
            [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # block 1 (p0=4), slot 1
            [1, 1, 1, 1, 0, 0, 0, 0, 1, 1],  # block 1, slot 2
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m[0, 0], expected)

    # Batch rows use their own anchors; anchor 0 sees no context at all.
    m2 = visibility_mask(torch.tensor([[0, 3], [1, 5]]), ctx_len=6, block_size=3)
    assert m2.shape == (2, 1, 6, 12)
    assert not m2[0, 0, :3, :6].any()
    assert m2[0, 0, 3:, :6].sum(-1).tolist() == [3, 3, 3]
    assert m2[1, 0, :3, :6].sum(-1).tolist() == [1, 1, 1]
    assert m2[1, 0, 3:, :6].sum(-1).tolist() == [5, 5, 5]
    # Block keys: each query sees exactly its own 3 block slots.
    assert m2[..., 6:].sum(-1).flatten().tolist() == [3] * 12


@pytest.mark.parametrize("markov", ["vanilla", "rnn"])
def test_visibility_by_perturbation(markov):
    target = tiny_target("qwen3")
    d = tiny_drafter(target, markov=markov, block_size=4)
    L = 16
    torch.manual_seed(1)
    ids = torch.randint(0, V - 1, (2, L))
    feats = features(target, ids, d.config.target_layer_ids).aux
    anchors = torch.tensor([[3, 7, 11], [2, 7, 12]])
    prev = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4).prev_tokens

    def run(f, i):
        with torch.no_grad():
            return d(f, i, anchors, prev).logits

    base = run(feats, ids)
    blk = 1  # the block anchored at p0 = 7 in both rows
    p0 = 7

    # Features at positions >= p0 are invisible to that block (but visible to the block at p0=11/12).
    f2 = feats.clone()
    f2[:, p0:] += torch.randn_like(f2[:, p0:]) * 3
    out = run(f2, ids)
    torch.testing.assert_close(out[:, blk], base[:, blk], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0], base[:, 0], atol=1e-6, rtol=0)
    assert _max_diff(out[:, 2], base[:, 2]) > 1e-3

    # Feature exactly at p0 (the anchor's own hidden state) is not visible either.
    f3 = feats.clone()
    f3[:, p0] += 5.0
    torch.testing.assert_close(run(f3, ids)[:, blk], base[:, blk], atol=1e-6, rtol=0)

    # A feature strictly before p0 is visible.
    f4 = feats.clone()
    f4[:, p0 - 1] += torch.randn_like(f4[:, p0 - 1]) * 3
    out = run(f4, ids)
    assert _max_diff(out[:, blk], base[:, blk]) > 1e-3
    torch.testing.assert_close(out[:, 0], base[:, 0], atol=1e-6, rtol=0)  # p0-1 = 6 >= 3 / 2

    # Another block's anchor token does not leak into this block (features and prev held fixed).
    ids2 = ids.clone()
    ids2[0, 11] = (ids2[0, 11] + 5) % (V - 1)
    ids2[0, 3] = (ids2[0, 3] + 7) % (V - 1)
    out = run(feats, ids2)
    torch.testing.assert_close(out[0, blk], base[0, blk], atol=1e-6, rtol=0)
    assert _max_diff(out[0, 2], base[0, 2]) > 1e-3  # the changed anchor does change its own block
    assert _max_diff(out[0, 0], base[0, 0]) > 1e-3
    torch.testing.assert_close(out[1], base[1], atol=1e-6, rtol=0)  # other batch row untouched

    # Its own anchor token does matter.
    ids3 = ids.clone()
    ids3[0, p0] = (ids3[0, p0] + 3) % (V - 1)
    assert _max_diff(run(feats, ids3)[0, blk], base[0, blk]) > 1e-3


# ----------------------------------------------------------------------------- 2. sampling loop


@pytest.mark.parametrize("markov", MARKOV_KINDS)
def test_draft_reproduces_teacher_forcing(markov):
    target = tiny_target("qwen3")
    g = 4
    d = tiny_drafter(target, markov=markov, block_size=g)
    L = 16
    torch.manual_seed(2)
    ids = torch.randint(0, V - 1, (1, L))
    feats = features(target, ids, d.config.target_layer_ids).aux
    p0 = 9
    anchors = torch.tensor([[2, p0, 5]])  # the compared block sits among others
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), g)
    assert tg.prev_tokens[0, 1].tolist() == ids[0, p0 : p0 + g].tolist()
    with torch.no_grad():
        out = d(feats, ids, anchors, tg.prev_tokens)
    for temp in (1.0, 0.7):
        dr = d.draft(feats[:, :p0], int(ids[0, p0]), temp, forced_tokens=ids[0, p0 + 1 : p0 + g + 1])
        assert dr.tokens.tolist() == ids[0, p0 + 1 : p0 + g + 1].tolist()
        expect = torch.softmax(out.logits[0, 1].float() / temp, dim=-1)
        torch.testing.assert_close(dr.probs, expect, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dr.probs.sum(-1), torch.ones(g), atol=1e-5, rtol=0)
        if markov == "off":
            assert d.markov_head is None
        torch.testing.assert_close(
            dr.confidence, torch.sigmoid(out.confidence_logits[0, 1]), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(dr.confidence_logits, out.confidence_logits[0, 1], atol=1e-5, rtol=1e-4)

    # Sampling at T=1 feeds back the sampled tokens: its probs equal teacher forcing on those tokens.
    dr = d.draft(feats[:, :p0], int(ids[0, p0]), 1.0, generator=torch.Generator().manual_seed(5))
    dr_again = d.draft(feats[:, :p0], int(ids[0, p0]), 1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(dr.tokens, dr_again.tokens)
    prev = torch.cat([ids[0, p0 : p0 + 1], dr.tokens[:-1]]).view(1, 1, g)
    with torch.no_grad():
        tf = d(feats, ids, torch.tensor([[p0]]), prev)
    torch.testing.assert_close(dr.probs, torch.softmax(tf.logits[0, 0], -1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("markov", MARKOV_KINDS)
def test_greedy_draft_is_argmax_chain(markov):
    target = tiny_target("qwen3")
    g = 5
    d = tiny_drafter(target, markov=markov, block_size=g, seed=3)
    torch.manual_seed(3)
    ids = torch.randint(0, V - 1, (1, 12))
    feats = features(target, ids, d.config.target_layer_ids).aux
    p0 = 6
    dr = d.draft(feats[:, :p0], int(ids[0, p0]), 0.0)
    assert dr.tokens.shape == (g,)
    # One-hot distributions on the drafted tokens.
    assert torch.equal(dr.probs, torch.nn.functional.one_hot(dr.tokens, V).float())
    # Each token is the argmax of the teacher-forced logits given the previously drafted tokens.
    prev = torch.cat([ids[0, p0 : p0 + 1], dr.tokens[:-1]]).view(1, 1, g)
    with torch.no_grad():
        out = d(feats, ids, torch.tensor([[p0]]), prev)
    assert out.logits[0, 0].argmax(-1).tolist() == dr.tokens.tolist()
    if markov != "off":
        # The Markov head matters here: a different previous token changes the slot's logits.
        prev2 = prev.clone()
        prev2[0, 0, 1:] = (prev2[0, 0, 1:] + 1) % (V - 1)
        with torch.no_grad():
            out2 = d(feats, ids, torch.tensor([[p0]]), prev2)
        assert _max_diff(out2.logits[0, 0, 1:], out.logits[0, 0, 1:]) > 1e-2
        torch.testing.assert_close(out2.logits[0, 0, 0], out.logits[0, 0, 0])  # slot 1 sees only the anchor


# ----------------------------------------------------------------------------- 6. target adapter


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_target_adapter_matches_hf_hidden_states(family):
    n = 5
    target = tiny_target(family, layers=n)
    torch.manual_seed(4)
    ids = torch.randint(0, V, (2, 9))
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    layer_ids = [-1, 0, 2, 3, n - 1]
    tm = TargetModel(target, layer_ids)
    assert not any(p.requires_grad for p in target.parameters())
    out = tm(ids, attention_mask=attn, with_logits=True)
    with torch.no_grad():
        ref = target(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    hs = ref.hidden_states
    assert len(hs) == n + 1
    assert out.aux.shape == (2, 9, len(layer_ids) * H)
    chunks = out.aux.split(H, dim=-1)
    for chunk, i in zip(chunks, layer_ids):
        if i < n - 1:  # -1 -> hidden_states[0] = embedding output
            torch.testing.assert_close(chunk, hs[i + 1], atol=0, rtol=0)
    torch.testing.assert_close(chunks[0], target.get_input_embeddings()(ids), atol=0, rtol=0)
    # final = the normed last state (HF's hidden_states[-1]); the raw last-layer output is *not* normed.
    torch.testing.assert_close(out.final, hs[-1], atol=0, rtol=0)
    assert _max_diff(chunks[-1], hs[-1]) > 1e-2
    torch.testing.assert_close(target.model.norm(chunks[-1]), out.final, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=0, rtol=0)
    torch.testing.assert_close(tm.lm_head(out.final), ref.logits, atol=1e-5, rtol=1e-5)
    assert tm(ids).logits is None


def test_target_adapter_refuses_bad_layer_ids():
    target = tiny_target("qwen3", layers=4)
    with pytest.raises(ValueError, match="the target has 4 layers"):
        TargetModel(target, [1, 4])
    with pytest.raises(ValueError, match="out of range"):
        TargetModel(target, [-2, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        TargetModel(target, [2, 1])


# ----------------------------------------------------------------------------- 7. shapes + training


def _fixed_batch(L=20, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, :4] = 0  # prompt
    anchors = torch.tensor([[4, 7, 10, 13, 16], [5, 8, 11, 14, 17]])[:B]
    return ids, mask, anchors, torch.ones_like(anchors)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("markov", ["vanilla", "gated", "rnn"])
def test_shapes_and_training_step(family, markov):
    target = tiny_target(family)
    g = 4
    d = tiny_drafter(target, markov=markov, block_size=g, std=0.02)
    c = d.config
    assert c.model_type == family and c.use_qk_norm == (family == "qwen3")
    assert c.target_layer_ids == [1]  # 4-layer target -> one layer, in range
    ids, mask, anchors, av = _fixed_batch()
    tm = TargetModel(target, c.target_layer_ids)
    feats = tm(ids)
    tg = block_targets(ids, mask, anchors, av, g)
    tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
    lcfg = LossConfig()
    denom = weighted_valid(tg.valid, lcfg.decay_gamma).sum()

    out = d(feats.aux, ids, anchors, tg.prev_tokens)
    B, A = anchors.shape
    assert out.logits.shape == (B, A, g, V)
    assert out.confidence_logits.shape == (B, A, g)
    assert out.hidden.shape == (B, A, g, H)
    assert tgt.shape == (B, A, g, V)

    d.train()
    frozen = (d.embed_tokens.weight.clone(), d.lm_head.weight.clone())
    params = d.trainable_parameters()
    assert all(p is not d.embed_tokens.weight and p is not d.lm_head.weight for p in params)
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(20):
        out = d(feats.aux, ids, anchors, tg.prev_tokens)
        loss = dspark_loss(out.logits, out.confidence_logits, tgt, tg, lcfg, denom).loss
        opt.zero_grad()
        loss.backward()
        assert d.markov_head.markov_w2.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(d.embed_tokens.weight, frozen[0]) and torch.equal(d.lm_head.weight, frozen[1])


def test_bf16_target_feeds_fp32_drafter_without_autocast():
    """recipe=qwen3 loads the target in bf16; with train.mixed_precision=no the drafter stays fp32 and
    must take the bf16 features as they are (this used to fail with a dtype mismatch in fc)."""
    target = tiny_target("qwen3")
    d = tiny_drafter(target, block_size=4)
    ids, mask, anchors, av = _fixed_batch()
    tm = TargetModel(target, d.config.target_layer_ids)
    feats = tm(ids)
    tg = block_targets(ids, mask, anchors, av, 4)
    bf16 = feats.aux.to(torch.bfloat16)
    out = d(bf16, ids, anchors, tg.prev_tokens)
    ref = d(bf16.float(), ids, anchors, tg.prev_tokens)  # the same values, upcast by hand
    assert out.logits.dtype == torch.float32
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.confidence_logits, ref.confidence_logits)
    draft = d.draft(bf16[:1, :8], int(ids[0, 8]), temperature=0.0)
    assert draft.tokens.shape[-1] == 4


def test_build_drafter_gives_each_kind_its_class():
    assert set(DRAFTER_CLASSES) == set(KINDS)
    target = tiny_target("qwen3", layers=6)
    for kind, cls in (("dspark", ParallelDrafter), ("dflash", ParallelDrafter), ("eagle3", Eagle3Drafter)):
        dc = DrafterConfig(kind=kind, num_layers=1, block_size=4, markov_rank=8)
        spec = resolve_drafter_config(dc, target.config.to_dict(), mask_token_id=MASK)
        d = build_drafter(spec)
        assert type(d) is cls and isinstance(d, Drafter) and d.config.kind == kind
        assert (d.markov_head is None) == (kind != "dspark")


# ----------------------------------------------------------------------------- 11. native export

NATIVE_EXPORT_KEYS = (
    "architectures",
    "num_hidden_layers",
    "num_target_layers",
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "tie_word_embeddings",
)


@pytest.mark.parametrize(
    "family,markov",
    [("qwen3", "vanilla"), ("qwen3", "gated"), ("qwen3", "rnn"), ("qwen3", "off"), ("llama", "rnn")],
)
def test_native_round_trip_float32(tmp_path, family, markov):
    target = tiny_target(family, layers=6)
    d = tiny_drafter(target, markov=markov, block_size=4)
    d.config.sts_temperatures = [1.0, 1.2, 0.9, 1.5]
    torch.manual_seed(6)
    ids = torch.randint(0, V - 1, (1, 14))
    feats = features(target, ids, d.config.target_layer_ids).aux
    anchors = torch.tensor([[3, 8]])
    prev = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4).prev_tokens
    with torch.no_grad():
        ref = d(feats, ids, anchors, prev)

    save_native(d, tmp_path / "f32", dtype="float32")
    d2 = load_native(tmp_path / "f32")
    for k in (
        "model_type",
        "target_layer_ids",
        "block_size",
        "mask_token_id",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "num_layers",
        "num_target_layers",
        "use_qk_norm",
        "rope_theta",
        "head_dim",
        "sts_temperatures",
    ):
        assert getattr(d2.config, k) == getattr(d.config, k), k
    assert not d2.embed_tokens.weight.requires_grad and not d2.lm_head.weight.requires_grad
    with torch.no_grad():
        out = d2(feats, ids, anchors, prev)
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.confidence_logits, ref.confidence_logits)


def test_native_bf16_export(tmp_path):
    target = tiny_target("qwen3", layers=8)
    d = tiny_drafter(target, markov="vanilla", block_size=5, rank=16)
    path = save_native(d, tmp_path / "bf16")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "deepspec", "model.safetensors"]
    tensors = {
        **load_file(str(path / "model.safetensors")),
        **load_file(str(path / "deepspec" / "extra.safetensors")),
    }
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    sd = d.state_dict()
    assert set(tensors) == set(sd)
    for k, t in tensors.items():
        assert torch.equal(t, sd[k].to(torch.bfloat16)), k
    nf = len(d.config.target_layer_ids)
    assert d.config.target_layer_ids == [1, 2, 3, 4, 5]
    expected_shapes = {
        "embed_tokens.weight": (V, H),
        "lm_head.weight": (V, H),
        "fc.weight": (H, nf * H),
        "hidden_norm.weight": (H,),
        "norm.weight": (H,),
        "markov_head.markov_w1.weight": (V, 16),
        "markov_head.markov_w2.weight": (V, 16),
        "confidence_head.proj.weight": (1, H + 16),
        "confidence_head.proj.bias": (1,),
    }
    for i in range(2):
        for n in ("q", "k", "v", "o"):
            assert f"layers.{i}.self_attn.{n}_proj.weight" in tensors
        for n in ("q", "k"):
            expected_shapes[f"layers.{i}.self_attn.{n}_norm.weight"] = (8,)
        for n in ("gate", "up", "down"):
            assert f"layers.{i}.mlp.{n}_proj.weight" in tensors
        for n in ("input", "post_attention"):
            expected_shapes[f"layers.{i}.{n}_layernorm.weight"] = (H,)
    for k, shape in expected_shapes.items():
        assert tuple(tensors[k].shape) == shape, k

    cfg = json.loads((path / "config.json").read_text())
    for k in NATIVE_EXPORT_KEYS:
        assert k in cfg, k
    assert cfg["architectures"] == ["Qwen3DSparkModel"]
    assert cfg["num_hidden_layers"] == 2 and cfg["num_target_layers"] == 8
    assert cfg["block_size"] == 5 and cfg["mask_token_id"] == MASK
    assert cfg["target_layer_ids"] == [1, 2, 3, 4, 5]
    assert cfg["markov_rank"] == 16 and cfg["markov_head_type"] == "vanilla"
    assert cfg["enable_confidence_head"] is True and cfg["confidence_head_with_markov"] is True
    assert cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == "bfloat16"  # not the target's stale value
    assert cfg["layer_types"] == ["full_attention"] * 2  # the drafter's layers, as DeepSpec writes them
    assert cfg["hidden_size"] == H and cfg["vocab_size"] == V and cfg["model_type"] == "qwen3"

    # The bf16 folder loads back, weights equal to the bf16-rounded originals.
    d2 = load_native(path)
    for k, v in d2.state_dict().items():
        assert torch.equal(v, tensors[k].float()), k
