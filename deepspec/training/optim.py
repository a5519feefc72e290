"""AdamW with linear warm-up then cosine decay (the defaults live in TrainConfig)."""

from __future__ import annotations

import math

import torch


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, peak: float = 1.0
) -> float:
    """The lr at optimizer step ``step`` (0-based): linear warm-up to ``peak`` over ``warmup_steps``,
    then cosine decay to ``min_ratio * peak`` at ``total_steps``, flat after that. The one schedule
    of the project: the drafter's optimizer and the tiny target's training both use it."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """``train.warmup_ratio`` as a step count: at least one step when the ratio is positive."""
    return max(1, int(round(warmup_ratio * total_steps))) if warmup_ratio > 0 else 0


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    return warmup_cosine(step, total_steps, warmup_steps(total_steps, warmup_ratio), min_lr_ratio)


def build_scheduler(optimizer, total_steps: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    )
