"""Anchor sampling and per-block labels (docs/method.md, Anchors).

An anchor is a position p with loss_mask[p] = loss_mask[p+1] = 1: the anchor token is part of the
answer and so is at least its first label. Block labels are tokens p0+1..p0+γ; a label counts only
while it is inside the sequence and loss-masked, and only as a contiguous prefix of the block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """Positions p of a 1-D mask with mask[p] = mask[p+1] = 1."""
    m = loss_mask.bool()
    return torch.nonzero(m[:-1] & m[1:], as_tuple=False).flatten()


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Up to ``num_anchors`` candidates, uniformly without replacement, sorted."""
    cand = anchor_candidates(loss_mask)
    if cand.numel() > num_anchors:
        pick = torch.randperm(cand.numel(), generator=generator)[:num_anchors]
        cand = cand[pick]
    return cand.sort().values


@dataclass
class BlockTargets:
    labels: torch.Tensor  # [B, A, γ] token at p0+k (0 where invalid)
    valid: torch.Tensor  # [B, A, γ] float: contiguous valid prefix of each block
    prev_tokens: torch.Tensor  # [B, A, γ] x_{k-1}: teacher-forced Markov/confidence input
    target_pos: torch.Tensor  # [B, A, γ] position whose target final hidden gives p_k (= p0+k-1)


def block_targets(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    anchors: torch.Tensor,
    anchor_valid: torch.Tensor,
    block_size: int,
) -> BlockTargets:
    """input_ids/loss_mask [B, L]; anchors/anchor_valid [B, A] -> per-slot labels and masks."""
    b, length = input_ids.shape
    k = torch.arange(1, block_size + 1, device=anchors.device)
    label_pos = anchors[:, :, None] + k  # p0+k
    inside = label_pos < length
    lp = label_pos.clamp(max=length - 1)
    flat = lp.reshape(b, -1)
    labels = torch.gather(input_ids, 1, flat).reshape(lp.shape)
    masked = torch.gather(loss_mask, 1, flat).reshape(lp.shape).bool()
    ok = inside & masked & anchor_valid[:, :, None].bool()
    valid = torch.cumprod(ok.to(torch.int32), dim=-1).to(torch.float32)
    prev_pos = label_pos - 1  # always < length since p0 < length
    prev = torch.gather(input_ids, 1, prev_pos.clamp(max=length - 1).reshape(b, -1)).reshape(lp.shape)
    return BlockTargets(
        labels=torch.where(valid.bool(), labels, torch.zeros_like(labels)),
        valid=valid,
        prev_tokens=prev,
        target_pos=prev_pos.clamp(max=length - 1),
    )


def slot_weights(block_size: int, decay_gamma: float, device=None) -> torch.Tensor:
    """w_k = exp(-(k-1)/γ_decay) for k = 1..block_size (all ones when decay_gamma <= 0)."""
    k = torch.arange(block_size, device=device, dtype=torch.float32)
    if decay_gamma <= 0:
        return torch.ones_like(k)
    return torch.exp(-k / decay_gamma)
