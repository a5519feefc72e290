"""Chat-template tokenisation for any HF tokenizer, with a loss mask on the assistant's tokens.

The mask is found from the template itself: the assistant turn starts where the rendering of the
conversation so far plus the generation prompt ends, and ends at the first end-of-turn token after
that. This only holds if rendering is prefix-stable, which is checked rather than assumed.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Sequence, Tuple

Messages = Sequence[Dict[str, str]]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot give a sound assistant mask for this conversation."""


def _render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{type(tokenizer).__name__} has no chat template")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str) -> List[int]:
    # Templates write BOS and friends themselves; adding them again would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_EOT_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def end_of_turn_ids(tokenizer) -> List[int]:
    """EOS plus the token the template closes a turn with (``<|im_end|>``, ``<|eot_id|>``, ...)."""
    try:
        return list(_EOT_CACHE[tokenizer])
    except (KeyError, TypeError):
        pass
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
    prompt = _encode(tokenizer, _render(tokenizer, probe[:1], True))
    full = _encode(tokenizer, _render(tokenizer, probe, False))
    special = set(tokenizer.all_special_ids) | {
        i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special
    }
    # The first special token after the assistant's text is the one that closes its turn.
    for tid in full[len(prompt) :]:
        if tid in special:
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


def _check_prefix(prefix: List[int], full: List[int], what: str, messages: Messages) -> None:
    if full[: len(prefix)] != prefix:
        at = next(i for i, (a, b) in enumerate(zip(prefix + [None], full + [None])) if a != b)
        raise ChatTemplateError(
            f"chat template tokenisation is not prefix-stable: {what} diverges from the full "
            f"conversation at token {at} (roles {[m['role'] for m in messages]}); "
            "the assistant loss mask cannot be located"
        )


def tokenize_conversation(tokenizer, messages: Messages, max_length: int) -> Tuple[List[int], List[int]]:
    """(input_ids, loss_mask) of a whole conversation, truncated to ``max_length``.

    ``loss_mask`` is 1 on each assistant turn's tokens through its end-of-turn token and 0 on
    everything else (system, user, role headers, generation prompts, separators after the turn).
    """
    if not messages:
        raise ValueError("empty conversation")
    eot = set(end_of_turn_ids(tokenizer))
    full = _encode(tokenizer, _render(tokenizer, messages, False))
    mask = [0] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _encode(tokenizer, _render(tokenizer, messages[:i], True)) if i else []
        _check_prefix(head, full, f"the prompt before message {i}", messages)
        upto = _encode(tokenizer, _render(tokenizer, messages[: i + 1], False))
        start = len(head)
        end = next((j + 1 for j in range(start, len(full)) if full[j] in eot), None)
        if full[: len(upto)] == upto and (end is None or end > len(upto)):
            end = len(upto)  # a template that closes turns without a special token
        # Otherwise the template rewrites this turn once later ones follow (Qwen3 drops the
        # empty <think> block of earlier turns), and the end-of-turn token alone marks the end.
        if end is None:
            raise ChatTemplateError(f"assistant message {i} has no end-of-turn token after it")
        mask[start:end] = [1] * (end - start)
    return full[:max_length], mask[:max_length]


def prompt_ids(tokenizer, messages: Messages) -> List[int]:
    """The conversation through its first user turn plus the generation prompt: what the target is fed."""
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("conversation has no user message")
    return _encode(tokenizer, _render(tokenizer, messages[: first_user + 1], True))
