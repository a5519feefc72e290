"""EAGLE-3 baseline: shapes, visibility, training-time test == autoregressive drafting, a training
step that lowers the loss, lossless greedy speculative decoding, the evaluator, export round trip
and config composition. Every target is a tiny randomly initialised Qwen3 (no download)."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from tiny_models import tiny_target

from deepspec.config import DrafterConfig, EvalConfig, LossConfig
from deepspec.data.anchors import block_targets, slot_weights
from deepspec.eval.runner import evaluate
from deepspec.eval.spec_decode import speculative_generate, target_generate
from deepspec.exporting.native import load_native, save_native
from deepspec.losses import dspark_loss, target_logits, weighted_valid
from deepspec.models import build_drafter
from deepspec.models.config import resolve_drafter_config
from deepspec.models.eagle3 import Eagle3Drafter, ttt_mask
from deepspec.target.adapter import TargetModel

V = 48
MASK = V - 1
H = 32
LAYER_IDS = [0, 1, 2]


def hf_target(seed: int = 0, init_range: float = 0.3):
    return tiny_target(
        layers=4,
        vocab=V,
        seed=seed,
        hidden_size=H,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=init_range,
    )


def eagle(
    target, block_size: int = 4, seed: int = 0, std: float = 0.1, attn_impl: str = "sdpa"
) -> Eagle3Drafter:
    dc = DrafterConfig(
        kind="eagle3",
        num_layers=1,
        block_size=block_size,
        target_layer_ids=LAYER_IDS,
        markov_rank=0,
        enable_confidence_head=False,
        attn_impl=attn_impl,
    )
    c = resolve_drafter_config(dc, target.config.to_dict(), mask_token_id=MASK)
    d = build_drafter(c)
    assert isinstance(d, Eagle3Drafter) and c.kind == "eagle3"
    d.init_weights(std=std, seed=seed)
    d.load_target_head(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    return d.eval()


def eagle_loss_cfg() -> LossConfig:
    return LossConfig(
        ce_weight=0.0,
        l1_weight=0.0,
        confidence_weight=0.0,
        soft_ce_weight=1.0,
        decay_gamma=1.0 / math.log(1.25),
    )


def batch(seed: int = 2, length: int = 18):
    torch.manual_seed(seed)
    ids = torch.randint(0, V - 1, (2, length))
    anchors = torch.tensor([[3, 8, 12], [2, 9, 13]])
    return ids, anchors


# ----------------------------------------------------------------------------- structure


def test_shapes_params_and_step_weights():
    t = hf_target()
    d = eagle(t, block_size=5)
    ids, anchors = batch()
    feats = TargetModel(t, LAYER_IDS)(ids)
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 5)
    out = d(feats.aux, ids, anchors, tg.prev_tokens)
    assert out.logits.shape == (2, 3, 5, V) and out.hidden.shape == (2, 3, 5, H)
    assert out.confidence_logits is None
    # One layer whose q/k/v read [embedding ; hidden] (2H); fc reads the 3 concatenated target layers.
    assert d.fc.weight.shape == (H, 3 * H)
    assert d.layers[0].self_attn.q_proj.weight.shape[1] == 2 * H
    assert len(d.layers) == 1 and d.markov_head is None and d.confidence_head is None
    # Step weights 0.8^(k-1) come out of the loss's slot decay.
    torch.testing.assert_close(slot_weights(5, eagle_loss_cfg().decay_gamma), 0.8 ** torch.arange(5.0))
    with pytest.raises(ValueError, match="exactly one layer"):
        resolve_drafter_config(
            DrafterConfig(
                kind="eagle3",
                num_layers=2,
                markov_rank=0,
                enable_confidence_head=False,
                target_layer_ids=LAYER_IDS,
            ),
            t.config.to_dict(),
            mask_token_id=MASK,
        )


def test_ttt_mask_small_case():
    m = ttt_mask(torch.tensor([[2, 4]]), ctx_len=5, num_slots=2).dense()
    expected = torch.tensor(
        [
            # ctx 0..4       | slot 1 (a0, a1) | slot 2 (a0, a1)
            [1, 1, 0, 0, 0, 1, 0, 1, 0],  # block anchored at 2
            [1, 1, 1, 1, 0, 0, 1, 0, 1],  # block anchored at 4
        ],
        dtype=torch.bool,
    )
    assert m.shape == (1, 1, 2, 9) and torch.equal(m[0, 0], expected)


def test_visibility_by_perturbation():
    """A block at p0 reads features of positions < p0 and tokens of positions <= p0 (via prev_tokens)."""
    t = hf_target()
    d = eagle(t)
    ids, anchors = batch()
    feats = TargetModel(t, LAYER_IDS)(ids).aux
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4)

    def run(f, i):
        with torch.no_grad():
            return d(f, i, anchors, tg.prev_tokens).logits

    base = run(feats, ids)
    # Row 0, block 1 is anchored at p0 = 8: features at >= 8 and context tokens at > 8 are invisible.
    f2 = feats.clone()
    f2[0, 8:] += 3.0
    out = run(f2, ids)
    torch.testing.assert_close(out[0, :2], base[0, :2], atol=1e-6, rtol=0)
    assert (out[0, 2] - base[0, 2]).abs().max() > 1e-3  # the block at 12 does see feature 8..11
    f3 = feats.clone()
    f3[0, 7] += 3.0  # f_{p0-1}: slot 1's hidden input
    assert (run(f3, ids)[0, 1] - base[0, 1]).abs().max() > 1e-3
    ids2 = ids.clone()
    ids2[0, 10] = (ids2[0, 10] + 1) % (V - 1)  # a context token after p0 (prev_tokens held fixed)
    torch.testing.assert_close(run(feats, ids2)[0, 1], base[0, 1], atol=1e-6, rtol=0)
    ids3 = ids.clone()
    ids3[0, 5] = (ids3[0, 5] + 1) % (V - 1)  # a context token before p0 is embedded in the context
    assert (run(feats, ids3)[0, 1] - base[0, 1]).abs().max() > 1e-4
    torch.testing.assert_close(run(feats, ids3)[1], base[1], atol=1e-6, rtol=0)  # other row untouched


# ----------------------------------------------------------------------------- training-time test == drafting


@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_draft_reproduces_training_time_test(temp):
    t = hf_target()
    g = 5
    d = eagle(t, block_size=g)
    torch.manual_seed(4)
    ids = torch.randint(0, V - 1, (1, 20))
    feats = TargetModel(t, LAYER_IDS)(ids).aux
    p0 = 10
    anchors = torch.tensor([[3, p0, 6]])  # the compared block sits among others
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), g)
    with torch.no_grad():
        out = d(feats, ids, anchors, tg.prev_tokens)
    forced = ids[0, p0 + 1 : p0 + g + 1]
    dr = d.draft(feats[:, :p0], int(ids[0, p0]), temp, forced_tokens=forced, context_ids=ids[:, :p0])
    assert dr.tokens.tolist() == forced.tolist() and dr.confidence is None
    torch.testing.assert_close(
        dr.probs, torch.softmax(out.logits[0, 1].float() / temp, -1), atol=1e-5, rtol=1e-4
    )

    # Sampling feeds back the sampled tokens: same probs as the training-time test on those tokens.
    dr = d.draft(
        feats[:, :p0],
        int(ids[0, p0]),
        temp,
        generator=torch.Generator().manual_seed(1),
        context_ids=ids[:, :p0],
    )
    prev = torch.cat([ids[0, p0 : p0 + 1], dr.tokens[:-1]]).view(1, 1, g)
    with torch.no_grad():
        tf = d(feats, ids, torch.tensor([[p0]]), prev)
    torch.testing.assert_close(dr.probs, torch.softmax(tf.logits[0, 0] / temp, -1), atol=1e-5, rtol=1e-4)

    # Greedy: each token is the argmax given the drafted tokens before it.
    dr = d.draft(feats[:, :p0], int(ids[0, p0]), 0.0, context_ids=ids[:, :p0])
    prev = torch.cat([ids[0, p0 : p0 + 1], dr.tokens[:-1]]).view(1, 1, g)
    with torch.no_grad():
        tf = d(feats, ids, torch.tensor([[p0]]), prev)
    assert tf.logits[0, 0].argmax(-1).tolist() == dr.tokens.tolist()
    with pytest.raises(ValueError, match="context_ids"):
        d.draft(feats[:, :p0], int(ids[0, p0]), 0.0)


def test_training_step_reduces_loss_and_keeps_target_head_frozen():
    t = hf_target()
    g = 4
    d = eagle(t, block_size=g, std=0.02).train()
    ids, anchors = batch()
    mask = torch.ones_like(ids)
    mask[:, :2] = 0
    tm = TargetModel(t, LAYER_IDS)
    feats = tm(ids)
    tg = block_targets(ids, mask, anchors, torch.ones_like(anchors), g)
    tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
    cfg = eagle_loss_cfg()
    denom = weighted_valid(tg.valid, cfg.decay_gamma).sum()
    frozen = (d.embed_tokens.weight.clone(), d.lm_head.weight.clone())
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = d(feats.aux, ids, anchors, tg.prev_tokens)
        lo = dspark_loss(out.logits, None, tgt, tg, cfg, denom)
        opt.zero_grad()
        lo.loss.backward()
        opt.step()
        losses.append(float(lo.loss.detach()))
    # The loss is the weighted soft CE, and gradients flow through the unroll into fc.
    assert float(lo.sums["soft_ce"]) / float(denom) == pytest.approx(losses[-1], rel=1e-5)
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(d.embed_tokens.weight, frozen[0]) and torch.equal(d.lm_head.weight, frozen[1])


# ----------------------------------------------------------------------------- speculative decoding


def _trained_eagle(t, tm, g):
    """An EAGLE-3 drafter fitted briefly to the target's greedy text, so rounds accept a mix of lengths."""
    d = eagle(t, block_size=g, seed=1, std=0.05).train()
    prompts = [[5, 1, 9], [2, 7, 3, 3], [11]]
    seqs = [p + target_generate(tm, p, 20, 0.0).tokens for p in prompts]
    ids = torch.tensor([s[:21] for s in seqs])
    feats = tm(ids)
    anchors = torch.arange(1, 19, 2).expand(3, -1)
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), g)
    tgt = target_logits(feats.final, tg.target_pos, tm.lm_head)
    cfg = eagle_loss_cfg()
    denom = weighted_valid(tg.valid, cfg.decay_gamma).sum()
    opt = torch.optim.AdamW(d.trainable_parameters(), lr=1e-2)
    for _ in range(30):
        loss = dspark_loss(d(feats.aux, ids, anchors, tg.prev_tokens).logits, None, tgt, tg, cfg, denom).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d.eval()


def test_greedy_speculative_equals_target_greedy_and_evaluator(tmp_path):
    t = hf_target(init_range=0.3)
    tm = TargetModel(t, LAYER_IDS)
    g = 4
    d = _trained_eagle(t, tm, g)
    accepted = []
    for prompt in ([5, 1, 9], [4, 4, 2, 8, 1], [13]):
        ref = target_generate(tm, prompt, 24, 0.0)
        spec = speculative_generate(tm, d, prompt, 24, 0.0)
        assert spec.tokens == ref.tokens  # lossless at T=0
        assert len(spec.tokens) == min(24, 1 + sum(r.tau for r in spec.rounds))
        accepted += [r.accepted for r in spec.rounds]
    assert max(accepted) > 0, "drafter never accepted: the test would not exercise partial rounds"

    cfg = EvalConfig(temperatures=[0.0, 1.0], max_new_tokens=12, num_prompts=2, seed=0)
    rep = evaluate(tm, d, [[5, 1, 9], [2, 7]], cfg, stop_ids=[], out_dir=str(tmp_path), progress=False)
    assert os.path.isfile(tmp_path / "eval.json")
    assert rep["temperatures"]["0.0"]["identical_outputs"] == 2
    assert 1.0 <= rep["temperatures"]["1.0"]["tau"] <= g + 1


def test_native_round_trip(tmp_path):
    t = hf_target()
    d = eagle(t)
    save_native(d, tmp_path / "drafter", dtype="float32")
    back = load_native(tmp_path / "drafter")
    assert isinstance(back, Eagle3Drafter) and back.config.kind == "eagle3"
    # Native folders written before drafter_kind said drafter_architecture; they load the same drafter.
    f = tmp_path / "drafter" / "config.json"
    raw = json.loads(f.read_text())
    assert raw["drafter_kind"] == "eagle3" and raw["num_hidden_layers"] == 1
    raw["drafter_architecture"] = raw.pop("drafter_kind")
    f.write_text(json.dumps(raw))
    assert load_native(tmp_path / "drafter").config == back.config
    ids, anchors = batch()
    feats = TargetModel(t, LAYER_IDS)(ids).aux
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4)
    with torch.no_grad():
        torch.testing.assert_close(
            back(feats, ids, anchors, tg.prev_tokens).logits, d(feats, ids, anchors, tg.prev_tokens).logits
        )
    # The serving formats carry DSpark/DFlash only: exporting EAGLE-3 there is refused before any write.
    from deepspec.exporting.formats import FormatError
    from deepspec.exporting.writer import export_drafter

    for fmt in ("speculators", "dflash", "native"):
        with pytest.raises(FormatError, match="eagle3"):
            export_drafter(d, tmp_path / fmt, fmt, dtype="float32")
        assert not (tmp_path / fmt).exists()


def test_hydra_model_eagle3_composes():
    from hydra import compose, initialize_config_dir

    from deepspec.config import register_configs

    register_configs()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with initialize_config_dir(config_dir=os.path.join(root, "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=eagle3"])
    assert cfg.model.kind == "eagle3" and cfg.model.num_layers == 1 and cfg.model.num_target_features == 3
    assert cfg.loss.soft_ce_weight == 1.0 and cfg.loss.ce_weight == 0 and cfg.loss.l1_weight == 0
    assert math.exp(-1.0 / cfg.loss.decay_gamma) == pytest.approx(0.8, abs=1e-12)
    c = resolve_drafter_config(
        cfg.model, {**hf_target().config.to_dict(), "num_hidden_layers": 6}, mask_token_id=MASK
    )
    assert c.kind == "eagle3" and c.target_layer_ids == [1, 2, 3]


def test_flex_attention_matches_sdpa_on_cpu():
    """Both forms of each visibility rule (dense mask for SDPA, mask_mod for flex) give the same outputs."""
    from deepspec.models.attention import HAS_FLEX

    if not HAS_FLEX:
        pytest.skip("this torch build has no flex attention")
    t = hf_target()
    ids, anchors = batch()
    feats = TargetModel(t, LAYER_IDS)(ids).aux
    tg = block_targets(ids, torch.ones_like(ids), anchors, torch.ones_like(anchors), 4)
    sd = eagle(t, attn_impl="sdpa")
    fx = eagle(t, attn_impl="flex")
    fx.load_state_dict(sd.state_dict())
    dc = DrafterConfig(num_layers=2, block_size=4, target_layer_ids=LAYER_IDS, markov_rank=8)
    ds = build_drafter(resolve_drafter_config(dc, t.config.to_dict(), mask_token_id=MASK))
    ds.init_weights(std=0.1, seed=0)
    dc.attn_impl = "flex"
    df = build_drafter(resolve_drafter_config(dc, t.config.to_dict(), mask_token_id=MASK))
    df.load_state_dict(ds.state_dict())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()" on CPU
        for a, b in ((sd, fx), (ds, df)):
            torch.testing.assert_close(
                b(feats, ids, anchors, tg.prev_tokens).logits,
                a(feats, ids, anchors, tg.prev_tokens).logits,
                atol=1e-5,
                rtol=1e-5,
            )
    from deepspec.models.attention import resolve_impl

    assert resolve_impl("auto", torch.device("cpu")) == "sdpa"
