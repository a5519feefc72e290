"""Tiny random Qwen3 / Llama / Gemma 4 targets and drafters for the export and hub tests (no download)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import tiny_models
import torch

V = 128
MASK = V - 1


# The export tests' defaults: 6 target layers, drafters reading 3 of them with the last row as MASK.
tiny_target = partial(tiny_models.tiny_target, layers=6, vocab=V)
tiny_drafter = partial(tiny_models.tiny_drafter, mask=MASK, num_target_features=3)


def save_target(target, path: Path) -> Path:
    target.save_pretrained(str(path))
    return path


def random_features(d, n: int = 6, seed: int = 0):
    """Seeded stand-in target features [1, n, num_features x target_hidden] for drafter ``d``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, d.config.num_features * d.config.target_hidden_size, generator=g)
