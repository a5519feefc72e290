"""The drafter's rotary tables equal the target's own rotary module, for every RoPE type supported."""

from __future__ import annotations

import pytest
import torch
from tiny_models import target_config

from deepspec.models.rope import RotaryEmbedding, check_rope, rope_parameters_of

MAX_POS = 64  # the target's context; positions below go well past it

LLAMA_ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _llama_rotary(rope):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = target_config(
        "llama",
        hidden_size=64,
        num_attention_heads=2,
        head_dim=32,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(rope),
    )
    return cfg, LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("kind", sorted(LLAMA_ROPES))
def test_matches_llama_rotary_past_the_context(kind):
    cfg, target = _llama_rotary(LLAMA_ROPES[kind])
    ours = RotaryEmbedding(rope_parameters_of(cfg.to_dict()), 32, MAX_POS)
    pos = torch.arange(0, 4 * MAX_POS)[None, :]  # well past the original context
    x = torch.zeros(1, 1, dtype=torch.float32)
    cos_t, sin_t = target(x, pos)
    cos, sin = ours.cos_sin(pos, torch.float32)
    torch.testing.assert_close(cos, cos_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=0, atol=1e-6)


def test_llama3_differs_from_plain_rope_far_out():
    """The check above is not vacuous: llama3 scaling changes the long-wavelength angles."""
    rope = LLAMA_ROPES["llama3"]
    scaled = RotaryEmbedding(rope, 32, MAX_POS)
    plain = RotaryEmbedding({"rope_type": "default", "rope_theta": rope["rope_theta"]}, 32, MAX_POS)
    pos = torch.tensor([200])
    assert (scaled.cos_sin(pos, torch.float32)[0] - plain.cos_sin(pos, torch.float32)[0]).abs().max() > 0.1


def test_yarn_attention_scaling_applied():
    rope = LLAMA_ROPES["yarn"]
    r = RotaryEmbedding(rope, 32, MAX_POS)
    assert r.scaling > 1.0
    cos, _ = r.cos_sin(torch.tensor([0]), torch.float32)
    torch.testing.assert_close(cos, torch.full_like(cos, r.scaling))


def test_dynamic_is_static_inside_the_context():
    d = RotaryEmbedding(LLAMA_ROPES["dynamic"], 32, MAX_POS)
    plain = RotaryEmbedding({"rope_type": "default", "rope_theta": 10000.0}, 32, MAX_POS)
    inside = torch.arange(MAX_POS)
    assert torch.equal(d.cos_sin(inside, torch.float32)[0], plain.cos_sin(inside, torch.float32)[0])
    outside = torch.arange(2 * MAX_POS)
    assert not torch.equal(
        d.cos_sin(outside, torch.float32)[0][:MAX_POS], plain.cos_sin(inside, torch.float32)[0]
    )


def test_legacy_rope_scaling_and_theta_are_read():
    cfg = {"rope_theta": 123.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_parameters_of(cfg) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 123.0}
    assert rope_parameters_of({}) == {"rope_type": "default", "rope_theta": 10000.0}


def test_gemma4_full_attention_rope_matches_target():
    from transformers import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    cfg = Gemma4TextConfig(
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=32,
        num_hidden_layers=2,
        max_position_embeddings=MAX_POS,
    )
    target = Gemma4TextRotaryEmbedding(cfg)
    ours = RotaryEmbedding(rope_parameters_of(cfg.to_dict(), "full_attention"), 32, MAX_POS)
    assert ours.kind == "proportional"
    pos = torch.arange(3 * MAX_POS)[None, :]
    cos_t, sin_t = target(torch.zeros(1), pos, "full_attention")
    cos, sin = ours.cos_sin(pos, torch.float32)
    torch.testing.assert_close(cos, cos_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, sin_t, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="full_attention"):
        rope_parameters_of({"rope_parameters": {"sliding_attention": {"rope_theta": 1.0}}}, "full_attention")


def test_unsupported_rope_is_refused_by_name():
    with pytest.raises(ValueError, match=r"rope_type='mrope'.*expected one of"):
        check_rope({"rope_type": "mrope", "rope_theta": 1.0})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        check_rope({"rope_type": "default", "rope_theta": 1.0, "partial_rotary_factor": 0.5})
