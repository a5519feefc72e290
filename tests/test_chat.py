"""Template-driven chat tokenisation: the loss mask covers exactly the assistant's turns."""

from __future__ import annotations

import copy

import pytest

from deepspec.data.chat import ChatTemplateError, end_of_turn_ids, prompt_ids, tokenize_conversation
from deepspec.target.tiny import CHAT_TEMPLATE, _render_chat, train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i, 'hello world')\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 20

TWO_TURNS = [
    {"role": "user", "content": 'def add(a, b):\n    """Sum."""'},
    {"role": "assistant", "content": "return a + b"},
    {"role": "user", "content": "def neg(x):"},
    {"role": "assistant", "content": "if x:\n    return -x\nreturn 0"},
]

# Like Qwen3: the last assistant turn carries an empty think block that earlier turns lose.
THINK_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
    "{%- if m['role'] == 'assistant' and loop.last %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


def masked_spans(tokenizer, ids, mask):
    spans, cur = [], []
    for t, m in zip(ids, mask):
        if m:
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tokenizer.decode(s) for s in spans]


def test_template_matches_fast_renderer(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == _render_chat(TWO_TURNS)
    rendered = tok.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "system" not in rendered


def test_end_of_turn_ids(tok):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    assert end_of_turn_ids(tok) == [im_end]


def test_mask_covers_assistant_content_and_im_end_multi_turn(tok):
    ids, mask = tokenize_conversation(tok, TWO_TURNS, max_length=4096)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == _render_chat(TWO_TURNS)
    assert masked_spans(tok, ids, mask) == [
        "return a + b<|im_end|>",
        "if x:\n    return -x\nreturn 0<|im_end|>",
    ]


def test_mask_single_turn_and_truncation(tok):
    ids, mask = tokenize_conversation(tok, TWO_TURNS[:2], max_length=4096)
    assert masked_spans(tok, ids, mask) == ["return a + b<|im_end|>"]
    assert mask[-1] == 0  # the newline after <|im_end|> is not the assistant's
    short_ids, short_mask = tokenize_conversation(tok, TWO_TURNS[:2], max_length=len(ids) - 3)
    assert short_ids == ids[: len(ids) - 3] and short_mask == mask[: len(ids) - 3]


def test_prompt_ids_is_first_user_turn_with_generation_prompt(tok):
    p = prompt_ids(tok, TWO_TURNS)
    assert tok.decode(p) == _render_chat(TWO_TURNS[:1]) + "<|im_start|>assistant\n"
    ids, mask = tokenize_conversation(tok, TWO_TURNS, max_length=4096)
    assert ids[: len(p)] == p and mask[len(p)] == 1 and not any(mask[: len(p)])


def test_template_that_rewrites_earlier_turns(tok):
    t = copy.deepcopy(tok)
    t.chat_template = THINK_TEMPLATE
    ids, mask = tokenize_conversation(t, TWO_TURNS, max_length=4096)
    assert masked_spans(t, ids, mask) == [
        "return a + b<|im_end|>",
        "<think>\n\n</think>\n\nif x:\n    return -x\nreturn 0<|im_end|>",
    ]


def test_mask_located_in_rendering_even_when_generation_prompt_differs(tok):
    t = copy.deepcopy(tok)
    # The generation prompt says "assistant" but the rendered turn says "bot": the mask is found from
    # the rendered text's offsets, so it still covers exactly the answers.
    t.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + ('bot' if m['role'] == 'assistant' else m['role'])"
        " + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    ids, mask = tokenize_conversation(t, TWO_TURNS, max_length=4096)
    spans = masked_spans(t, ids, mask)
    assert len(spans) == 2 and spans[0] == "return a + b<|im_end|>"


def test_no_template_raises(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        prompt_ids(t, TWO_TURNS)
