"""Chat-template tokenisation for any HF fast tokenizer, with a loss mask on the assistant's tokens.

The conversation is rendered once with the tokenizer's own template; the mask is located in the
*text* and mapped to tokens through the tokenizer's offset mapping, so nothing relies on the
template being prefix-stable token by token (a BPE merge of "\\n" and leading spaces across the
prompt/answer boundary used to make ~0.4% of records unusable), and templates that rewrite earlier
turns (Qwen3 drops think blocks of all but the last turn) work too.

For assistant message i:
  * its content is found by rendering the same conversation with that content replaced by a
    sentinel: the text before the sentinel is the exact rendered prefix, the text after it the
    exact rendered suffix, so ``[len(prefix), len(full) - len(suffix))`` is the content's span in
    the full rendering, whatever the template does to whitespace;
  * the span starts earlier when the generation prompt of the conversation so far (rendered with
    the same template arguments) is a text prefix of the full rendering and ends before the
    content: whatever the model itself writes after that prompt (a thinking block in thinking
    mode) is part of the answer; what the prompt writes (Qwen3's empty ``<think>\\n\\n</think>\\n\\n``
    in non-thinking mode) is not;
  * the span ends with the first end-of-turn token after the content.
A token is masked when it overlaps the span (a token straddling the boundary holds answer text).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

Messages = Sequence[Dict[str, str]]
SENTINEL = "DEEPSPEC7SENTINEL3f9a"


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot give a sound assistant mask for this conversation."""


def render(
    tokenizer, messages: Messages, add_generation_prompt: bool, template_kwargs: Optional[Mapping] = None
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat template")
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **dict(template_kwargs or {}),
    )


_render = render  # older name


def _encode(tokenizer, text: str) -> List[int]:
    # Templates write BOS and friends themselves; adding them again would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_offsets(tokenizer, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: loss masks need its offset mapping"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def special_ids(tokenizer) -> set:
    return set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special
    }


_EOT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer) -> List[int]:
    """EOS plus the token the template closes a turn with (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``)."""
    try:
        return list(_EOT_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": SENTINEL}]
    text = render(tokenizer, probe, False)
    after = text.find(SENTINEL) + len(SENTINEL)
    toks, offsets = _encode_offsets(tokenizer, text)
    special = special_ids(tokenizer)
    # The first special token after the assistant's text is the one that closes its turn.
    for tid, (a, _b) in zip(toks, offsets):
        if a >= after and tid in special:
            if tid not in ids:
                ids.append(int(tid))
            break
    if not ids:
        raise ChatTemplateError("tokenizer has no EOS and its template closes turns with no special token")
    try:
        _EOT_CACHE[tokenizer] = tuple(ids)
    except TypeError:
        pass  # not weak-referenceable: recomputed next time
    return ids


def _keep_inline_reasoning(content: str) -> str:
    """The part of ``content`` through an inline ``</think>`` (and the whitespace after it), else ''.

    Templates that split inline reasoning out of the content (Qwen3) must see the same reasoning in
    the sentinel rendering, or the text around the answer would differ."""
    k = content.rfind("</think>") if isinstance(content, str) else -1
    if k < 0:
        return ""
    k += len("</think>")
    while k < len(content) and content[k].isspace():
        k += 1
    return content[:k]


def assistant_spans(
    tokenizer, messages: Messages, template_kwargs: Optional[Mapping] = None
) -> Tuple[str, List[Tuple[int, int, int]]]:
    """The full rendering and, per assistant message, (message index, span start, content end) in characters."""
    full = render(tokenizer, messages, False, template_kwargs)
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        probe = [dict(m) for m in messages]
        probe[i]["content"] = _keep_inline_reasoning(message["content"]) + SENTINEL
        marked = render(tokenizer, probe, False, template_kwargs)
        k = marked.find(SENTINEL)
        if k < 0:
            raise ChatTemplateError(f"the chat template does not render assistant message {i}'s content")
        before, after = marked[:k], marked[k + len(SENTINEL) :]
        if not (full.startswith(before) and full.endswith(after) and len(before) + len(after) <= len(full)):
            raise ChatTemplateError(
                f"the chat template renders the text around assistant message {i} differently depending on "
                "its content; the assistant loss mask cannot be located"
            )
        start, content_end = len(before), len(full) - len(after)
        if i > 0:
            prompt = render(tokenizer, messages[:i], True, template_kwargs)
            if full.startswith(prompt) and cursor <= len(prompt) <= start:
                start = len(prompt)
        if start < cursor:
            raise ChatTemplateError(
                f"assistant message {i} overlaps the previous assistant turn in the rendering"
            )
        spans.append((i, start, content_end))
        cursor = content_end
    return full, spans


def tokenize_conversation(
    tokenizer, messages: Messages, max_length: int, template_kwargs: Optional[Mapping] = None
) -> Tuple[List[int], List[int]]:
    """(input_ids, loss_mask) of a whole conversation, truncated to ``max_length``.

    ``loss_mask`` is 1 on each assistant turn's tokens through its end-of-turn token and 0 on
    everything else (system, user, role headers, generation prompts, separators after the turn).
    """
    if not messages:
        raise ValueError("empty conversation")
    eot = set(end_of_turn_ids(tokenizer))
    full, spans = assistant_spans(tokenizer, messages, template_kwargs)
    ids, offsets = _encode_offsets(tokenizer, full)
    mask = [0] * len(ids)
    j = 0
    for i, start, content_end in spans:
        while j < len(ids) and offsets[j][1] <= start:
            j += 1
        first = j
        while j < len(ids) and not (ids[j] in eot and offsets[j][0] >= content_end):
            j += 1
        if j == len(ids):
            raise ChatTemplateError(f"assistant message {i} has no end-of-turn token after it")
        mask[first : j + 1] = [1] * (j + 1 - first)
        j += 1
    return ids[:max_length], mask[:max_length]


def prompt_ids(tokenizer, messages: Messages, template_kwargs: Optional[Mapping] = None) -> List[int]:
    """The conversation through its first user turn plus the generation prompt: what the target is fed."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("conversation has no user message")
    return _encode(tokenizer, render(tokenizer, messages[: first_user + 1], True, template_kwargs))


def generation_prompt_ids(
    tokenizer, messages: Messages, template_kwargs: Optional[Mapping] = None
) -> List[int]:
    """Token ids of ``messages`` (ending with a user turn) plus the generation prompt."""
    return _encode(tokenizer, render(tokenizer, messages, True, template_kwargs))


def template_kwargs_of(data_cfg) -> Dict[str, object]:
    """The chat-template arguments of a DataConfig (the same at generation, training and eval)."""
    enable_thinking = getattr(data_cfg, "enable_thinking", None)
    return {} if enable_thinking is None else {"enable_thinking": bool(enable_thinking)}
