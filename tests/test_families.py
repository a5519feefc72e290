"""Drafter layer families: what each copies from its target, what it refuses, and Gemma 4's layer
against transformers' own Gemma 4 decoder layer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny_models import target_config

from deepspec.models.families import FAMILIES, family_for_target, text_config
from deepspec.models.gemma4 import Gemma4DrafterLayer
from deepspec.models.rope import RotaryEmbedding


def gemma4_text_config(k_eq_v: bool = False, softcap=None, **kw):
    from transformers import Gemma4TextConfig

    args = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=16,
        layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0,
        max_position_embeddings=64,
        attention_k_eq_v=k_eq_v,
        num_global_key_value_heads=1 if k_eq_v else None,
        final_logit_softcapping=softcap,
        tie_word_embeddings=False,
    )
    args.update(kw)
    cfg = Gemma4TextConfig(**args)
    cfg._attn_implementation = "eager"
    return cfg


def test_every_supported_target_maps_to_one_family():
    assert family_for_target("qwen3").name == "qwen3"
    assert family_for_target("qwen3_moe").name == "qwen3"
    assert family_for_target("llama").name == "llama"
    assert family_for_target("gemma4").name == family_for_target("gemma4_text").name == "gemma4_text"
    with pytest.raises(ValueError, match=r"model_type 'phi3' has no drafter layer family.*'qwen3_moe'"):
        family_for_target("phi3")


def test_qwen3_moe_target_gets_a_dense_qwen3_drafter():
    from transformers import Qwen3MoeConfig

    t = Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=80, moe_intermediate_size=16, num_experts=4
    ).to_dict()
    arch = family_for_target(t["model_type"]).arch(t)
    assert arch["model_type"] == "qwen3" and arch["use_qk_norm"]
    assert arch["intermediate_size"] == 80  # the dense MLP width, not the experts'


def test_llama3_rope_is_copied_and_unhonourable_fields_are_refused():

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    t = target_config("llama", rope_parameters=rope).to_dict()
    arch = FAMILIES["llama"].arch(t)
    assert arch["rope_parameters"] == rope and not arch["use_qk_norm"]
    with pytest.raises(ValueError, match=r"mlp_bias=True.*llama.*\[False\]"):
        FAMILIES["llama"].arch({**t, "mlp_bias": True})
    with pytest.raises(ValueError, match=r"rope_type='mrope'.*expected one of"):
        FAMILIES["llama"].arch({**t, "rope_parameters": {"rope_type": "mrope", "rope_theta": 1.0}})


def test_gemma4_copies_global_heads_scale_and_softcap():
    for nested in (False, True):
        cfg = gemma4_text_config(k_eq_v=True, softcap=30.0).to_dict()
        if nested:  # the multimodal Gemma 4 config nests the text model
            cfg = {"model_type": "gemma4", "text_config": cfg}
        t = text_config(cfg)
        arch = family_for_target(cfg["model_type"]).arch(t)
        assert arch["head_dim"] == 16 and arch["num_key_value_heads"] == 1 and arch["attention_k_eq_v"]
        assert arch["attn_scale"] == 1.0 and arch["embed_scale"] == math.sqrt(32)
        assert arch["final_logit_softcapping"] == 30.0 and arch["hidden_act"] == "gelu_pytorch_tanh"
        assert arch["rope_parameters"]["rope_type"] == "proportional"
    # A config written with the explicit keys DeepSpec reads (older transformers) gives the same.
    t = gemma4_text_config().to_dict()
    t.pop("per_layer_config")
    t.update(global_head_dim=16)
    assert FAMILIES["gemma4_text"].arch(t)["head_dim"] == 16
    with pytest.raises(ValueError, match=r"hidden_activation='swoosh'.*supported values"):
        FAMILIES["gemma4_text"].arch({**t, "hidden_activation": "swoosh"})


def _spec(cfg) -> SimpleNamespace:
    arch = FAMILIES["gemma4_text"].arch(cfg.to_dict())
    return SimpleNamespace(**arch, attn_impl="sdpa")


@pytest.mark.parametrize("k_eq_v", [False, True], ids=["separate-v", "k-eq-v"])
def test_gemma4_layer_equals_transformers_full_attention_layer(k_eq_v):
    """Same weights, same input, causal mask and no injected context: the drafter layer computes
    exactly what transformers' Gemma 4 full-attention decoder layer computes."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer, Gemma4TextRotaryEmbedding

    torch.manual_seed(0)
    cfg = gemma4_text_config(k_eq_v=k_eq_v)
    ref = Gemma4TextDecoderLayer(cfg, layer_idx=1).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
        ref.layer_scalar.fill_(0.7)
    ours = Gemma4DrafterLayer(_spec(cfg)).eval()
    # The tensor names are transformers' (and DeepSpec's): a strict load must succeed.
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert (ours.self_attn.v_proj is None) == k_eq_v

    t = 6
    x = torch.randn(1, t, 32)
    pos = torch.arange(t)[None]
    cos_r, sin_r = Gemma4TextRotaryEmbedding(cfg)(x, pos, "full_attention")
    from deepspec.models.rope import rope_parameters_of

    rope = RotaryEmbedding(rope_parameters_of(cfg.to_dict(), "full_attention"), 16, 64)
    cos, sin = rope.cos_sin(pos, torch.float32)
    torch.testing.assert_close(cos, cos_r)
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(1, 1, t, t).masked_fill(~causal, float("-inf"))
    with torch.no_grad():
        want = ref(x, shared_kv_states={}, position_embeddings=(cos_r, sin_r), attention_mask=additive)
        empty = torch.zeros(1, ours.self_attn.n_kv, 0, 16)
        got = ours(x, cos, sin, empty, empty, causal)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_markov_head_the_export_cannot_carry_stops_before_training(tmp_path):
    from train_fixtures import compose

    from deepspec.exporting.formats import FormatError
    from deepspec.training.loop import preflight

    out = tmp_path / "out"
    base = [f"train.output_dir={out}", "model.markov_head_type=rnn"]
    with pytest.raises(
        FormatError, match=r"export.format=speculators.*markov_head_type='rnn'.*\['vanilla'\]"
    ):
        preflight(compose(base))
    assert not out.exists()  # nothing written
    preflight(compose(base + ["export.format=native"]))  # DeepSpec's format carries every head
    preflight(compose(base + ["export.after_training=false"]))


def test_gemma4_moe_target_gets_a_dense_drafter(tmp_path):
    from export_fixtures import tiny_drafter

    from deepspec.exporting.native import native_config

    moe = gemma4_text_config(
        vocab_size=128, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=8
    )
    arch = FAMILIES["gemma4_text"].arch(moe.to_dict())
    assert arch["intermediate_size"] == 48  # the dense MLP's width; the drafter has no experts

    class Target:  # what tiny_drafter reads from a target
        config = moe

        @staticmethod
        def get_input_embeddings():
            return torch.nn.Embedding(128, 32)

        @staticmethod
        def get_output_embeddings():
            return torch.nn.Linear(32, 128, bias=False)

    d = tiny_drafter(Target)
    assert not any("expert" in k or "router" in k for k in d.state_dict())
    cfg = native_config(d.config, "float32")
    assert cfg["enable_moe_block"] is False and cfg["hidden_size_per_layer_input"] == 0
