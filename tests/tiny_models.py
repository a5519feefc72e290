"""Tiny random HF targets, tokenizers and model folders for the tests (no download, built in milliseconds).

One place for them, so a test that needs "some Qwen3 target" does not spell out a config of its own.
"""

from __future__ import annotations

from pathlib import Path

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


def target_config(family: str = "qwen3", **overrides):
    """A transformers config of a tiny target; ``overrides`` replace fields of TARGET_DEFAULTS."""
    from transformers import LlamaConfig, Qwen3Config

    classes = {"qwen3": Qwen3Config, "llama": LlamaConfig}
    if family not in classes:
        raise ValueError(f"family {family!r}: expected one of {sorted(classes)}")
    return classes[family](**{**TARGET_DEFAULTS, **overrides})


def tiny_target(family: str = "qwen3", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM in eval mode (same seed, same weights)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(target_config(family, **overrides)).eval()


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
    target = target if target is not None else tiny_target(vocab_size=len(SPECIAL + WORDS))
    path.mkdir(parents=True, exist_ok=True)
    if safetensors:
        target.save_pretrained(str(path))
    else:
        target.config.save_pretrained(str(path))
        torch.save(target.state_dict(), path / "pytorch_model.bin")
    word_tokenizer().save_pretrained(str(path))
    return path
