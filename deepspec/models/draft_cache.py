"""The drafter's KV cache at inference: its context, computed once per position and extended each round.

A drafter reads the target's features at the committed positions 0..n-1 (its context). What it makes
of a position (the projected feature, each layer's rotated key and value) never changes once the
position is committed, so serving engines keep it and only add the positions each round commits.
:class:`DraftCache` holds those tensors for B rows of different lengths: row b's positions
0..``lengths[b]``-1 sit at indices 0..``lengths[b]``-1 along each tensor's position axis (left
aligned, like the target's cache); indices past that are stale and must be masked by the reader.
Every drafter's attention already hides context keys at or after a block's anchor, and the anchor of
row b is at position ``lengths[b]``, so the stale tail is never seen.

A rejected draft never enters the drafter's context (only committed tokens do), so there is nothing
to crop: the next extension overwrites the stale tail in place.
"""

from __future__ import annotations

from typing import Dict

import torch


class DraftCache:
    """Named per-row tensors, each with one position axis, plus the committed length of every row."""

    def __init__(self, batch_size: int, device: torch.device | str) -> None:
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._bufs: Dict[str, torch.Tensor] = {}
        self._dims: Dict[str, int] = {}
        self.meta: Dict[str, object] = {}  # drafter-specific facts about how the tensors were made

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def __contains__(self, name: str) -> bool:
        return name in self._bufs

    def write(self, name: str, new: torch.Tensor, dim: int) -> None:
        """Store ``new`` (row b's index j along ``dim`` is position ``lengths[b] + j``).

        Rows that commit fewer than ``new.shape[dim]`` positions get padding written past their new
        length; it stays behind the mask until overwritten. Call :meth:`advance` once every tensor of
        the step is written.
        """
        b, t = new.shape[0], new.shape[dim]
        if b != self.batch_size:
            raise ValueError(f"draft cache {name!r}: {b} rows given, the cache holds {self.batch_size}")
        need = self.max_length + t
        buf = self._bufs.get(name)
        if buf is None or buf.shape[dim] < need:
            # Grow geometrically, so extending by a few positions per round copies O(length) in total.
            cap = max(need, 2 * (buf.shape[dim] if buf is not None else 0), 64)
            shape = list(new.shape)
            shape[dim] = cap
            grown = new.new_zeros(shape)
            if buf is not None:
                grown.narrow(dim, 0, buf.shape[dim]).copy_(buf)
            buf = self._bufs[name] = grown
            self._dims[name] = dim
        view = [1] * new.dim()
        view[dim] = t
        index = self.lengths.view(b, *([1] * (new.dim() - 1))) + torch.arange(t, device=new.device).view(view)
        buf.scatter_(dim, index.expand(new.shape), new.to(buf.dtype))

    def read(self, name: str) -> torch.Tensor:
        """The tensor up to the longest row (shorter rows' tails are stale)."""
        return self._bufs[name].narrow(self._dims[name], 0, self.max_length)

    def gather_at(self, name: str, positions: torch.Tensor) -> torch.Tensor:
        """Row b's entry at ``positions[b]`` (each < ``lengths[b]``): [B, ...] with the position axis dropped."""
        buf, dim = self._bufs[name], self._dims[name]
        shape = list(buf.shape)
        shape[dim] = 1
        index = positions.view(-1, *([1] * (buf.dim() - 1))).expand(shape)
        return buf.gather(dim, index).squeeze(dim)

    def advance(self, counts: torch.Tensor) -> None:
        """Row b now holds ``counts[b]`` more committed positions."""
        self.lengths += counts.to(self.lengths)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch), in that order: finished prompts leave the batch."""
        self.lengths = self.lengths[rows]
        for name, buf in self._bufs.items():
            self._bufs[name] = buf[rows]
