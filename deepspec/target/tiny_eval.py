"""Held-out measures of a built tiny target (deepspec/target/tiny.py): text and chat loss, a sample reply."""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from deepspec.config import TinyTargetConfig
from deepspec.data.chat import tokenize_conversation


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """Rows of ``length`` tokens beginning at the given offsets (clamped to fit in the stream)."""
    starts = starts.clamp(max=max(0, stream.numel() - length))
    idx = starts[:, None] + torch.arange(min(length, stream.numel()))[None, :]
    return stream[idx]


@torch.no_grad()
def heldout_text_loss(model, cfg: TinyTargetConfig, stream: torch.Tensor) -> float:
    """Mean next-token loss on evenly spaced windows of the held-out files' token stream."""
    length = min(cfg.seq_len + 1, stream.numel())
    n = cfg.eval_batches * cfg.batch_size
    offsets = torch.linspace(0, stream.numel() - length, n).long()
    total, count = 0.0, 0
    for chunk in offsets.split(cfg.batch_size):
        batch = windows(stream, chunk, length)
        logits = model(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def heldout_chat_loss(model, cfg: TinyTargetConfig, tokenizer, chats: List[List[Dict]]) -> float:
    """Mean loss on the assistant tokens (loss-masked, through <|im_end|>) of held-out conversations."""
    n = min(len(chats), cfg.eval_batches * cfg.batch_size)
    chosen = [chats[int(i)] for i in torch.linspace(0, len(chats) - 1, n).long()] if n else []
    seqs = [tokenize_conversation(tokenizer, messages, cfg.seq_len + 1) for messages in chosen]
    total, count = 0.0, 0
    for b in range(0, len(seqs), cfg.batch_size):
        group = seqs[b : b + cfg.batch_size]
        width = max(len(ids) for ids, _ in group)
        ids = torch.full((len(group), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        attn = torch.zeros((len(group), width), dtype=torch.long)
        for r, (seq, mask) in enumerate(group):
            ids[r, : len(seq)] = torch.tensor(seq)
            attn[r, : len(seq)] = 1
            labels[r, : len(seq)] = torch.tensor([t if m else -100 for t, m in zip(seq, mask)])
        logits = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).logits
        target = labels[:, 1:]
        total += F.cross_entropy(
            logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
    return total / max(1, count)


@torch.no_grad()
def sample_reply(model, tokenizer, messages: List[Dict], max_new_tokens: int = 48) -> Dict:
    """The greedy reply to a conversation's prompt, beside the prompt text."""
    from deepspec.data.chat import prompt_ids

    prompt = prompt_ids(tokenizer, messages)
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return {"prompt": tokenizer.decode(prompt), "greedy": tokenizer.decode(out[0, len(prompt) :])}
