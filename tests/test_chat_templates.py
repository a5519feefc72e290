"""Golden tests: chat rendering and assistant loss masks for Qwen3, Llama 3 and Gemma templates, and the tiny one."""

from __future__ import annotations

import pytest
from chat_fixtures import gemma_tokenizer, llama3_tokenizer, qwen3_tokenizer

from deepspec.data.chat import (
    assistant_spans,
    end_of_turn_ids,
    generation_prompt_ids,
    prompt_ids,
    render,
    tokenize_conversation,
)

NO_THINK = {"enable_thinking": False}
ONE = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
TWO = ONE + [
    {"role": "user", "content": "Write a haiku."},
    {"role": "assistant", "content": "Waves fold into foam"},
]
SYS = [{"role": "system", "content": "Be brief."}] + ONE


@pytest.fixture(scope="module")
def toks():
    return {"qwen3": qwen3_tokenizer(), "llama3": llama3_tokenizer(), "gemma": gemma_tokenizer()}


def masked_segments(tok, ids, mask):
    """Decoded runs of masked tokens, in order."""
    segs, cur = [], []
    for i, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(i)
        elif cur:
            segs.append(tok.decode(cur))
            cur = []
    return segs


def check(tok, messages, text, segments, kwargs=None):
    assert render(tok, messages, False, kwargs) == text
    ids, mask = tokenize_conversation(tok, messages, 10_000, kwargs)
    assert tok.decode(ids) == text  # the tokens are the rendering, nothing added (no double BOS)
    assert masked_segments(tok, ids, mask) == segments
    return ids, mask


# ----------------------------------------------------------------------------- Qwen3


QWEN_ONE = (
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\nFour.<|im_end|>\n"
)


def test_qwen3_non_thinking_single_turn(toks):
    tok = toks["qwen3"]
    ids, mask = check(tok, ONE, QWEN_ONE, ["Four.<|im_end|>"], NO_THINK)
    # The empty think block belongs to the generation prompt, which is exactly the unmasked prefix.
    prompt = generation_prompt_ids(tok, ONE[:1], NO_THINK)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids[: len(prompt)] == prompt and sum(mask[: len(prompt)]) == 0
    assert sum(mask) == len(tok.encode("Four.", add_special_tokens=False)) + 1
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert prompt_ids(tok, ONE, NO_THINK) == prompt


def test_qwen3_multi_turn_drops_earlier_think_blocks(toks):
    text = (
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
        "<|im_start|>user\nWrite a haiku.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nWaves fold into foam<|im_end|>\n"
    )
    check(toks["qwen3"], TWO, text, ["Four.<|im_end|>", "Waves fold into foam<|im_end|>"], NO_THINK)


def test_qwen3_thinking_mode_masks_the_reasoning(toks):
    msgs = [ONE[0], {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}]
    text = (
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>\n"
    )
    # The model writes the think block itself in thinking mode: it is part of the answer.
    check(
        toks["qwen3"],
        msgs,
        text,
        ["<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"],
        {"enable_thinking": True},
    )
    # Reasoning inline in the content is split out by the template, same rendering.
    inline = [ONE[0], {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nFour."}]
    check(
        toks["qwen3"],
        inline,
        text,
        ["<think>\nTwo and two.\n</think>\n\nFour.<|im_end|>"],
        {"enable_thinking": True},
    )


def test_qwen3_system_only_when_given(toks):
    tok = toks["qwen3"]
    assert "system" not in render(tok, ONE, False, NO_THINK)
    check(tok, SYS, "<|im_start|>system\nBe brief.<|im_end|>\n" + QWEN_ONE, ["Four.<|im_end|>"], NO_THINK)


# ----------------------------------------------------------------------------- Llama 3


def test_llama3(toks):
    tok = toks["llama3"]
    head = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
    one = head + "<|start_header_id|>assistant<|end_header_id|>\n\nFour.<|eot_id|>"
    check(tok, ONE, one, ["Four.<|eot_id|>"])
    two = one + (
        "<|start_header_id|>user<|end_header_id|>\n\nWrite a haiku.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nWaves fold into foam<|eot_id|>"
    )
    check(tok, TWO, two, ["Four.<|eot_id|>", "Waves fold into foam<|eot_id|>"])
    sys_text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        + one[len("<|begin_of_text|>") :]
    )
    check(tok, SYS, sys_text, ["Four.<|eot_id|>"])
    # EOS of the base model is <|end_of_text|>; the turn terminator is found from the template.
    assert tok.convert_tokens_to_ids("<|eot_id|>") in end_of_turn_ids(tok)
    # The template trims content: the mask follows the rendering, not the raw string.
    padded = [ONE[0], {"role": "assistant", "content": "  Four. \n"}]
    check(tok, padded, one, ["Four.<|eot_id|>"])


# ----------------------------------------------------------------------------- Gemma


def test_gemma(toks):
    tok = toks["gemma"]
    one = (
        "<bos><start_of_turn>user\nWhat is two plus two?<end_of_turn>\n"
        "<start_of_turn>model\nFour.<end_of_turn>\n"
    )
    check(tok, ONE, one, ["Four.<end_of_turn>"])
    two = (
        one
        + "<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\nWaves fold into foam<end_of_turn>\n"
    )
    check(tok, TWO, two, ["Four.<end_of_turn>", "Waves fold into foam<end_of_turn>"])
    # Gemma folds a system message into the first user turn.
    sys_text = one.replace("user\nWhat", "user\nBe brief.\n\nWhat")
    check(tok, SYS, sys_text, ["Four.<end_of_turn>"])
    assert tok.convert_tokens_to_ids("<end_of_turn>") in end_of_turn_ids(tok)
    assert prompt_ids(tok, TWO) == tok.encode(
        one.split("<start_of_turn>model")[0] + "<start_of_turn>model\n", add_special_tokens=False
    )


# ----------------------------------------------------------------------------- common behaviour


@pytest.mark.parametrize("family", ["qwen3", "llama3", "gemma"])
def test_truncation_and_user_only(toks, family):
    tok = toks[family]
    ids, mask = tokenize_conversation(tok, TWO, 10_000, NO_THINK)
    short_ids, short_mask = tokenize_conversation(tok, TWO, 9, NO_THINK)
    assert short_ids == ids[:9] and short_mask == mask[:9]
    ids, mask = tokenize_conversation(tok, ONE[:1], 10_000, NO_THINK)
    assert sum(mask) == 0 and len(ids) > 0


def test_spans_are_text_offsets(toks):
    tok = toks["qwen3"]
    full, spans = assistant_spans(tok, TWO, NO_THINK)
    assert [full[s:e] for _, s, e in spans] == ["Four.", "Waves fold into foam"]


def test_tiny_template_boundary_merge_is_masked():
    """The tiny tokenizer merges "\\n" with the answer's leading spaces across the prompt boundary
    (not prefix-stable): the straddling token holds answer text, so it is masked; nothing is skipped."""
    from deepspec.target.tiny import CHAT_TEMPLATE, train_tokenizer

    texts = ["def f(x):\n    return x + 1\n", "class A:\n    def g(self):\n        return 2\n"] * 20
    tok = train_tokenizer(texts, 300)
    assert tok.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "    return x + 1"}]
    prompt = generation_prompt_ids(tok, msgs[:1])
    ids, mask = tokenize_conversation(tok, msgs, 1000)
    assert ids[: len(prompt)] != prompt  # the old prefix method could not handle this record
    segs = masked_segments(tok, ids, mask)
    assert len(segs) == 1 and segs[0].endswith("    return x + 1<|im_end|>")
    assert segs[0][: -len("    return x + 1<|im_end|>")].strip() == ""  # at most the merged newline
