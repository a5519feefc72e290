"""Deterministic global sample order and padded batches with anchors.

The order of samples is a function of (seed, epoch) only, and step s of the run consumes global
positions [s·G, (s+1)·G). A rank takes a fixed slice of that window, so the data seen by an optimizer
step does not depend on the world size, and the data position of a run is just its step number.
Anchors are drawn with a generator seeded by (seed, epoch, sample index) for the same reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from deepspec.data.anchors import sample_anchors


@dataclass
class Example:
    input_ids: List[int]
    loss_mask: List[int]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    loss_mask: torch.Tensor  # [B, L] 0 on padding
    attention_mask: torch.Tensor  # [B, L]
    anchors: torch.Tensor  # [B, A] padded with 0
    anchor_valid: torch.Tensor  # [B, A]
    keys: Optional[List[Tuple[int, int]]] = None  # (epoch, sample index) per row: finds cached features

    def to(self, device) -> Batch:
        return Batch(
            *(
                t.to(device)
                for t in (
                    self.input_ids,
                    self.loss_mask,
                    self.attention_mask,
                    self.anchors,
                    self.anchor_valid,
                )
            ),
            keys=self.keys,
        )


@functools.lru_cache(maxsize=4)
def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


def global_indices(num_samples: int, seed: int, step: int, global_batch: int) -> List[Tuple[int, int]]:
    """(epoch, sample index) for the ``global_batch`` samples of optimizer step ``step``."""
    out = []
    for pos in range(step * global_batch, (step + 1) * global_batch):
        epoch, i = divmod(pos, num_samples)
        out.append((epoch, int(epoch_order(num_samples, seed, epoch)[i])))
    return out


def collate(
    examples: Sequence[Example], keys: Sequence[Tuple[int, int]], num_anchors: int, seed: int, pad_id: int
) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    b = len(examples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    attn = torch.zeros((b, length), dtype=torch.long)
    anchor_lists = []
    for r, (e, (epoch, idx)) in enumerate(zip(examples, keys)):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        mask[r, :n] = torch.tensor(e.loss_mask)
        attn[r, :n] = 1
        g = torch.Generator().manual_seed((seed * 7919 + epoch) * 1_000_003 + idx)
        anchor_lists.append(sample_anchors(mask[r, :n], num_anchors, g))
    a = max(1, max(len(x) for x in anchor_lists))
    anchors = torch.zeros((b, a), dtype=torch.long)
    valid = torch.zeros((b, a), dtype=torch.long)
    for r, x in enumerate(anchor_lists):
        anchors[r, : len(x)] = x
        valid[r, : len(x)] = 1
    return Batch(ids, mask, attn, anchors, valid, keys=[(int(e), int(i)) for e, i in keys])
