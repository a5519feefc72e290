"""Tiny random HF targets, tokenizers and model folders for the tests (no download, built in milliseconds).

One place for them, so a test that needs "some Qwen3 target" does not spell out a config of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

# Defaults of every tiny target: 4 heads of 8, GQA 2 kv heads, so both attention paths are exercised.
TARGET_DEFAULTS = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
FAMILIES = ("qwen3", "llama", "gemma4")


def target_config(family: str = "qwen3", **overrides):
    """A transformers config of a tiny target; ``overrides`` replace fields of TARGET_DEFAULTS.

    gemma4 alternates sliding and full attention layers (full last when the count is odd), has a
    separate head width for the full layers and soft-caps its logits, as the real family does."""
    kw = {**TARGET_DEFAULTS, **overrides}
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**kw)
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**kw)
    if family == "gemma4":
        from transformers import Gemma4TextConfig

        n = kw["num_hidden_layers"]
        kw.setdefault(
            "layer_types", ["sliding_attention", "full_attention"] * (n // 2) + ["full_attention"] * (n % 2)
        )
        kw.setdefault("global_head_dim", 16)
        kw.setdefault("hidden_size_per_layer_input", 0)
        kw.setdefault("final_logit_softcapping", 30.0)  # Gemma soft-caps its logits
        return Gemma4TextConfig(**kw)
    raise ValueError(f"family {family!r}: expected one of {FAMILIES}")


def tiny_target(family: str = "qwen3", layers: int = 4, vocab: int = 128, seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in eval mode (same arguments, same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = target_config(family, num_hidden_layers=layers, vocab_size=vocab, **overrides)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_drafter(
    target,
    kind: str = "dspark",
    markov: str = "vanilla",
    seed: int = 0,
    sts=None,
    *,
    mask: Optional[int] = None,
    num_layers: int = 2,
    block_size: int = 4,
    rank: int = 16,
    std: float = 0.1,
    layer_ids="auto",
    num_target_features: Optional[int] = None,
    confidence: bool = True,
    w1_scale: float = 0.0,
    w2_scale: float = 0.1,
):
    """A drafter for ``target`` (an HF model) built through the one factory, with its target's frozen
    embedding and lm_head. ``markov="off"`` means rank 0. init_weights zeroes W2 (the head starts as
    plain DFlash), so W2 (and W1 when ``w1_scale``) get random values here: the head then matters.
    ``mask`` defaults to the last vocabulary row."""
    from deepspec.config import DrafterConfig
    from deepspec.models import build_drafter
    from deepspec.models.config import resolve_drafter_config

    off = markov == "off"
    kw = dict(
        kind=kind,
        num_layers=num_layers,
        block_size=block_size,
        target_layer_ids=layer_ids,
        markov_rank=0 if off else rank,
        markov_head_type="vanilla" if off else markov,
        enable_confidence_head=confidence,
    )
    if num_target_features is not None:
        kw["num_target_features"] = num_target_features
    tc = target.config.to_dict()
    mask = tc["vocab_size"] - 1 if mask is None else mask
    spec = resolve_drafter_config(DrafterConfig(**kw), tc, mask_token_id=mask)
    spec.sts_temperatures = sts
    d = build_drafter(spec)
    d.init_weights(std=std, seed=seed)
    d.load_target_head(target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    if d.markov_head is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for w, scale in (
                (d.markov_head.markov_w1.weight, w1_scale),
                (d.markov_head.markov_w2.weight, w2_scale),
            ):
                if scale:
                    w.copy_(torch.randn(w.shape, generator=g) * scale)
    return d.eval()


SPECIAL = ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["[UNK]", "user", "assistant"] + [f"w{i}" for i in range(25)]  # 4 + 28 = 32 ids
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def word_tokenizer():
    """A 32-id whitespace word-level fast tokenizer with a ChatML template and a mask token (id 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL[0],
        mask_token=SPECIAL[1],
        pad_token=SPECIAL[0],
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL[2:],
    )
    fast.chat_template = CHATML
    return fast


def model_folder(path: Path, target=None, safetensors: bool = True) -> Path:
    """Save a tiny target (default: a fresh 32-token Qwen3) and the word tokenizer as an HF folder;
    ``safetensors=False`` writes the weights as a pickled ``pytorch_model.bin`` instead."""
    target = target if target is not None else tiny_target(vocab=len(SPECIAL + WORDS))
    path.mkdir(parents=True, exist_ok=True)
    if safetensors:
        target.save_pretrained(str(path))
    else:
        target.config.save_pretrained(str(path))
        torch.save(target.state_dict(), path / "pytorch_model.bin")
    word_tokenizer().save_pretrained(str(path))
    return path
