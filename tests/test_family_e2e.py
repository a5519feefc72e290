"""Every target family end to end: a tiny random target of the family, a drafter trained on it by the
real training job, exported (native + speculators), reloaded, and decoding greedily exactly as the
target does. Each run is a few steps on micro sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import micro_overrides, train_here

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # decoding runs past it
}


def family_config(family: str, vocab: int, tok):
    """A tiny random config of each family, with the family's own quirks switched on."""
    from tiny_models import target_config
    from transformers import Qwen3MoeConfig

    common = dict(
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "qwen3":
        return target_config("qwen3", **common)
    if family == "qwen3_moe":  # the MoE variant keeps the shared tiny sizes
        moe = target_config("qwen3", **common).to_dict()
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        keep += ("num_key_value_heads", "head_dim")
        sizes = {k: moe[k] for k in keep}
        return Qwen3MoeConfig(
            **common, **sizes, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2
        )
    if family == "llama":
        return target_config("llama", **common, rope_parameters=dict(LLAMA3_ROPE))
    if family == "gemma4":
        return target_config("gemma4", **common, sliding_window=16, final_logit_softcapping=30.0)
    raise AssertionError(family)


def make_target(family: str, tiny_cache: Path, out: Path) -> Path:
    """A random target of ``family`` sharing the micro tiny target's tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_dir = next(tiny_cache.glob("tiny-target-*"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok), tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


FAMILIES = ["qwen3", "qwen3_moe", "llama", "gemma4"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_exports_and_decodes_losslessly(family, tiny_cache, tmp_path):
    from deepspec.eval.spec_decode import speculative_generate, target_generate
    from deepspec.exporting.writer import load_export
    from deepspec.target.adapter import TargetModel

    target_dir = make_target(family, tiny_cache, tmp_path / "target")
    out = tmp_path / "run"
    # Gemma runs through recipe=gemma (its settings sized down to this micro target).
    recipe = (
        [
            "recipe=gemma",
            "model.target_layer_ids=auto",
            "data.source=tiny_chat",
            "target.dtype=float32",
            "train.global_batch_size=8",
            "train.micro_batch_size=4",
            "train.mixed_precision=no",
            "train.checkpoint.every=100",
        ]
        if family == "gemma4"
        else []
    )
    train_here(
        recipe
        + micro_overrides(tiny_cache, out)
        + [
            f"target.name_or_path={target_dir}",
            "model.mask_token_id=auto",
            "train.max_steps=3",
            "eval.enabled=true",
            "eval.temperatures=[0.0]",
            "eval.num_prompts=2",
            "eval.max_new_tokens=12",
            "eval.calibration=false",
            "eval.scheduler=false",
            "eval.plots=false",
            "export.format=speculators",
        ]
    )
    report = json.loads((out / "eval.json").read_text())
    assert report["temperatures"]["0.0"]["identical_outputs"] == report["num_prompts"] == 2

    native = json.loads((out / "drafter" / "config.json").read_text())
    want_arch = {"gemma4": "Gemma4DSparkModel", "llama": "LlamaDSparkModel"}.get(family, "Qwen3DSparkModel")
    assert native["architectures"] == [want_arch]
    spec_cfg = json.loads((out / "export" / "speculators" / "config.json").read_text())
    layer = spec_cfg["transformer_layer_config"]
    if family == "llama":  # the exported configs describe exactly the RoPE that was trained
        assert layer["rope_parameters"] == LLAMA3_ROPE
        assert native["rope_parameters"] == LLAMA3_ROPE
    if family == "qwen3_moe":  # the drafter is dense, of the matching dense family
        assert layer["model_type"] == native["model_type"] == "qwen3"
        assert native["target_model_type"] == "qwen3_moe"
    if family == "gemma4":
        assert layer["model_type"] == "gemma4_text" and native["global_head_dim"] == 16
        assert native["final_logit_softcapping"] == 30.0

    target = TargetModel.from_pretrained(str(target_dir), native["target_layer_ids"])
    prompt = [5, 17, 99, 3, 250, 8, 41]
    want = target_generate(target, prompt, 40).tokens  # 47 positions: past llama3's original 32
    for folder in (out / "drafter", out / "export" / "speculators"):
        drafter = load_export(folder, target.embed_tokens.weight, target.lm_head.weight)
        got = speculative_generate(target, drafter, prompt, 40).tokens
        assert got == want, folder.name


@pytest.mark.slow
def test_embedded_default_as_gemma4(tmp_path):
    """``target.tiny.family=gemma4``: the embedded target is built as a Gemma 4 model, and its drafter
    trains, evaluates losslessly and exports through the Gemma 4 family (micro sizes)."""
    from train_fixtures import MICRO_TARGET
    from transformers import AutoConfig

    cache, out = tmp_path / "cache", tmp_path / "run"
    overrides = micro_overrides(cache, out) + [
        "target.tiny.family=gemma4",
        "train.max_steps=3",
        "eval.enabled=true",
        "eval.temperatures=[0.0]",
        "eval.num_prompts=2",
        "eval.max_new_tokens=12",
        "eval.calibration=false",
        "eval.scheduler=false",
        "eval.plots=false",
    ]
    train_here(overrides)
    built = next(cache.glob("tiny-target-*"))
    cfg = AutoConfig.from_pretrained(built)
    assert cfg.model_type == "gemma4_text" and cfg.final_logit_softcapping == 30.0
    assert cfg.num_hidden_layers == MICRO_TARGET["num_layers"] and cfg.layer_types[-1] == "full_attention"
    native = json.loads((out / "drafter" / "config.json").read_text())
    assert native["architectures"] == ["Gemma4DSparkModel"]
    report = json.loads((out / "eval.json").read_text())
    assert report["temperatures"]["0.0"]["identical_outputs"] == report["num_prompts"] == 2
    assert (out / "export" / "speculators" / "config.json").is_file()
