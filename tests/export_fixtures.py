"""Tiny random Qwen3 / Llama / Gemma 4 targets and drafters for the export and hub tests (no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from deepspec.config import DrafterConfig
from deepspec.models.config import resolve_drafter_config
from deepspec.models.parallel import ParallelDrafter

V = 128
MASK = V - 1


def tiny_target(family: str = "qwen3", layers: int = 6, vocab: int = V, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    if family == "gemma4":
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        gemma = dict(global_head_dim=16, hidden_size_per_layer_input=0, final_logit_softcapping=30.0)
        pattern = ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
        return Gemma4ForCausalLM(Gemma4TextConfig(**kw, **gemma, layer_types=pattern)).eval()
    model = Qwen3ForCausalLM(Qwen3Config(**kw)) if family == "qwen3" else LlamaForCausalLM(LlamaConfig(**kw))
    return model.eval()


def tiny_drafter(
    target, kind: str = "dspark", markov: str = "vanilla", seed: int = 0, sts=None
) -> ParallelDrafter:
    dc = DrafterConfig(
        kind=kind, num_layers=2, block_size=4, markov_rank=16, markov_head_type=markov, num_target_features=3
    )
    cfg = resolve_drafter_config(dc, target.config.to_dict(), mask_token_id=MASK)
    cfg.sts_temperatures = sts
    d = ParallelDrafter(cfg)
    d.init_weights(std=0.1, seed=seed)
    d.load_target_head(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    if d.markov_head is not None:
        # init_weights zeroes W2 (the head starts as plain DFlash); give it values so it matters.
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            w = d.markov_head.markov_w2.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return d.eval()


def save_target(target, path: Path) -> Path:
    target.save_pretrained(str(path))
    return path
