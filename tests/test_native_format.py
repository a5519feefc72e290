"""The native format is DeepSpec's: config keys and tensor names per family and per Markov head type,
exactly as DeepSpec's Qwen3DSparkModel / Gemma4DSparkModel load them; and the refusals of formats
that cannot carry a head type or a family."""

from __future__ import annotations

import json

import pytest
import torch
from export_fixtures import tiny_drafter, tiny_target

from deepspec.exporting.check import check_export
from deepspec.exporting.formats import FormatError
from deepspec.exporting.writer import drafter_outputs, export_drafter, load_export

HEAD_TENSORS = {
    "vanilla": ["markov_head.markov_w1.weight", "markov_head.markov_w2.weight"],
    "gated": [
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "markov_head.gate_proj.weight",
        "markov_head.gate_proj.bias",
    ],
    "rnn": [
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "markov_head.joint_proj.weight",
        "markov_head.joint_proj.bias",
    ],
}
COMMON = ["embed_tokens.weight", "lm_head.weight", "fc.weight", "hidden_norm.weight", "norm.weight"]
COMMON += ["confidence_head.proj.weight", "confidence_head.proj.bias"]
# The greedy-acceptance output (docs/method.md, Confidence head) is deepspec's own: it is kept out of
# model.safetensors (DeepSpec's and vLLM's loaders refuse unknown names), in deepspec/extra.safetensors.
EXTRA = ["confidence_head.greedy_proj.weight", "confidence_head.greedy_proj.bias"]


def layer_tensors(family: str, i: int):
    attn = [f"layers.{i}.self_attn.{n}_proj.weight" for n in ("q", "k", "v", "o")]
    attn += [f"layers.{i}.self_attn.{n}_norm.weight" for n in ("q", "k")] if family != "llama" else []
    mlp = [f"layers.{i}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    norms = ["input", "post_attention"] + (
        ["pre_feedforward", "post_feedforward"] if family == "gemma4" else []
    )
    extra = [f"layers.{i}.layer_scalar"] if family == "gemma4" else []  # a buffer DeepSpec's layer saves
    return attn + mlp + [f"layers.{i}.{n}_layernorm.weight" for n in norms] + extra


# The keys DeepSpec's model classes assert on load (plus, for Gemma 4, its text-config checks).
DEEPSPEC_KEYS = [
    "target_layer_ids",
    "mask_token_id",
    "num_anchors",
    "enable_confidence_head",
    "markov_rank",
    "markov_head_type",
    "confidence_head_with_markov",
    "block_size",
    "num_target_layers",
    "num_hidden_layers",
    "layer_types",
    "tie_word_embeddings",
]
GEMMA4_TEXT_KEYS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_global_key_value_heads",
    "global_head_dim",
    "attention_bias",
    "attention_dropout",
    "attention_k_eq_v",
    "enable_moe_block",
    "head_dim",
    "hidden_activation",
    "hidden_size_per_layer_input",
    "initializer_range",
    "max_position_embeddings",
    "num_key_value_heads",
    "num_kv_shared_layers",
    "rms_norm_eps",
    "rope_parameters",
    "use_double_wide_mlp",
    "target_model_type",
    "target_text_model_type",
]
ARCH = {"qwen3": "Qwen3DSparkModel", "llama": "LlamaDSparkModel", "gemma4": "Gemma4DSparkModel"}


@pytest.fixture(scope="module")
def targets():
    return {fam: tiny_target(fam) for fam in ("qwen3", "llama", "gemma4")}


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma4"])
@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_native_tensor_names_and_keys_are_deepspecs(targets, family, head, tmp_path):
    d = tiny_drafter(targets[family], markov=head)
    out = export_drafter(d, tmp_path / "n", "native", "float32")
    from safetensors.torch import load_file

    names = set(load_file(str(out / "model.safetensors")))
    golden = set(COMMON + HEAD_TENSORS[head] + layer_tensors(family, 0) + layer_tensors(family, 1))
    assert names == golden
    assert set(load_file(str(out / "deepspec" / "extra.safetensors"))) == set(EXTRA)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [ARCH[family]]
    for k in DEEPSPEC_KEYS + (GEMMA4_TEXT_KEYS if family == "gemma4" else []):
        assert k in cfg, k
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["markov_head_type"] == head
    if family == "gemma4":
        assert cfg["global_head_dim"] == 16 and cfg["head_dim"] == 8  # full-attention vs the target's sliding
        assert cfg["enable_moe_block"] is False and cfg["hidden_size_per_layer_input"] == 0
        assert cfg["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
        assert "per_layer_config" not in cfg
    # It reads back to the same drafter, computing the same logits.
    back = load_export(out)
    assert back.config.markov_head_type == head and back.config.head_dim == d.config.head_dim
    torch.testing.assert_close(drafter_outputs(back)[0], drafter_outputs(d)[0])


def test_deepspec_style_config_without_optional_keys_loads(targets, tmp_path):
    """DeepSpec writes markov_head_type / confidence_head_with_markov only when those heads exist, and a
    Gemma 4 config with global_head_dim / num_global_key_value_heads instead of per-layer overrides."""
    d = tiny_drafter(targets["gemma4"], kind="dflash")
    out = export_drafter(d, tmp_path / "n", "native", "float32")
    cfg = json.loads((out / "config.json").read_text())
    for k in ("markov_head_type", "confidence_head_with_markov", "drafter_kind"):
        cfg.pop(k)
    (out / "config.json").write_text(json.dumps(cfg))
    back = load_export(out)
    assert back.config.kind == "dflash" and back.config.head_dim == 16
    torch.testing.assert_close(drafter_outputs(back)[0], drafter_outputs(d)[0])


@pytest.mark.parametrize("head", ["gated", "rnn"])
def test_speculators_refuses_heads_vllm_does_not_run(targets, head, tmp_path):
    d = tiny_drafter(targets["qwen3"], markov=head)
    with pytest.raises(FormatError, match=rf"markov_head_type='{head}'.*\['vanilla'\].*export.format=native"):
        export_drafter(d, tmp_path / "s", "speculators")
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_dflash_refuses_gemma4_layers(targets, tmp_path):
    d = tiny_drafter(targets["gemma4"], kind="dflash")
    with pytest.raises(FormatError, match=r"gemma4_text.*\['native', 'speculators'\]"):
        export_drafter(d, tmp_path / "z", "dflash")


@pytest.mark.parametrize("fmt", ["native", "speculators"])
def test_gemma4_round_trip_and_checker(targets, fmt, tmp_path):
    target = targets["gemma4"]
    tdir = tmp_path / "target"
    target.save_pretrained(str(tdir))
    d = tiny_drafter(target)
    assert d.config.final_logit_softcapping == 30.0
    out = export_drafter(d, tmp_path / "x", fmt, "float32")
    rep = check_export(out, target=tdir, reference=d)
    assert rep.ok, rep.render()
    back = load_export(out, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    assert torch.equal(drafter_outputs(back)[0], drafter_outputs(d)[0])
    if fmt == "speculators":
        layer = json.loads((out / "config.json").read_text())["transformer_layer_config"]
        assert layer["model_type"] == "gemma4_text" and layer["layer_types"] == ["full_attention"] * 2


def test_checker_refuses_a_rope_that_is_not_the_targets(targets, tmp_path):
    """An export whose RoPE differs from the target's (here: llama3 scaling dropped) fails the check."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    plain = targets["llama"]
    torch.manual_seed(0)
    scaled = LlamaForCausalLM(LlamaConfig(**{**plain.config.to_dict(), "rope_parameters": rope})).eval()
    scaled_dir, plain_dir = tmp_path / "scaled", tmp_path / "plain"
    scaled.save_pretrained(str(scaled_dir))
    plain.save_pretrained(str(plain_dir))
    d = tiny_drafter(scaled)
    assert d.config.rope == rope
    for fmt in ("native", "speculators"):
        out = export_drafter(d, tmp_path / fmt, fmt, "float32")
        assert check_export(out, target=scaled_dir).ok
        rep = check_export(out, target=plain_dir)
        assert not rep.ok and any("rope_parameters" in e and "llama3" in e for e in rep.errors), rep.render()
