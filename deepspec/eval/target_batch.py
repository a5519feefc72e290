"""The target's side of batched decoding: one KV cache for B prompts of different committed lengths.

Each prompt is prefilled on its own (so its prompt pass is exactly the batch-1 computation) and the
caches are stacked, row b's positions 0..n_b-1 left aligned at cache indices 0..n_b-1, the rest
padding. A round appends every row's block [x0, drafts, padding] at the end of the cache with
explicit positions n_b + j and a 2-D attention mask that hides each row's padding, both the gap
between n_b and the cache's length and the padding at the end of a short block. After verification
:meth:`TargetBatch.commit` keeps each row's committed tokens and packs them back to the left (the
batched form of cropping the cache on rejection); rows whose prompt is finished leave the batch.

With one row and no padding the calls are exactly the batch-1 ones (no mask, no explicit positions,
``cache.crop``), so ``eval.batch_size=1`` decodes as before.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def prefill(target, prompt_ids: Sequence[int]):
    """Run the prompt through the target; returns (cache, features [1, n, F], last-position logits [V]).

    The prompt minus its last token goes in without logits, so a long prompt never materialises
    [n, V] logits; only the last position's are computed.
    """
    from transformers import DynamicCache

    if len(prompt_ids) == 0:
        raise ValueError("prompt is empty; speculative decoding needs at least one prompt token")
    cache = DynamicCache(config=target.config)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=target.device)
    feats = []
    if ids.shape[1] > 1:
        feats.append(target(ids[:, :-1], past_key_values=cache, use_cache=True).aux)
    out = target(ids[:, -1:], past_key_values=cache, use_cache=True, with_logits=True)
    feats.append(out.aux)
    return cache, torch.cat(feats, dim=1), out.logits[0, -1]


def _packable_layers(cache) -> List:
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", []))
    bad = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if bad or not layers:
        raise ValueError(
            f"eval.batch_size > 1 packs the target's KV cache per row, which needs full-attention "
            f"cache layers (transformers DynamicLayer); this target's cache has {bad or 'no layers'}. "
            "Use eval.batch_size=1 for this target."
        )
    return layers


class TargetBatch:
    """The stacked KV cache of the rows still decoding, and each row's committed length."""

    def __init__(self, caches: Sequence, lengths: Sequence[int]) -> None:
        self.cache = caches[0]
        # Sliding-window layers (Gemma 4, batch 1 only) keep what a verify pass appends until the
        # crop in commit(), so a rejected suffix can be taken back; full-attention layers are unaffected.
        self.cache.activate_past_recording()
        dev = self.cache.layers[0].keys.device
        self.lengths = torch.tensor(list(lengths), dtype=torch.long, device=dev)
        if len(caches) > 1:
            longest = int(self.lengths.max())
            per_row = [_packable_layers(c) for c in caches]
            for i, layer in enumerate(per_row[0]):
                for attr in ("keys", "values"):
                    parts = [getattr(rows[i], attr) for rows in per_row]
                    pad = [torch.nn.functional.pad(p, (0, 0, 0, longest - p.shape[2])) for p in parts]
                    setattr(layer, attr, torch.cat(pad, dim=0))
        self._pending: Tuple[int, int] = (0, 0)

    @property
    def size(self) -> int:
        return self.lengths.shape[0]

    def step(self, target, block: torch.Tensor, block_lens: torch.Tensor):
        """Score ``block`` [R, T] (row r's first ``block_lens[r]`` tokens are real) after each row's
        committed tokens; returns the target's output (logits [R, T, V], aux [R, T, F])."""
        cache_len = self.cache.get_seq_length()
        t = block.shape[1]
        padded = bool((self.lengths != cache_len).any() or (block_lens != t).any())
        mask = positions = None
        if padded:
            dev = block.device
            seen = torch.arange(cache_len, device=dev)[None] < self.lengths[:, None]
            real = torch.arange(t, device=dev)[None] < block_lens[:, None]
            mask = torch.cat([seen, real], dim=1).long()
            positions = self.lengths[:, None] + torch.arange(t, device=dev)
        self._pending = (cache_len, t)
        return target(
            block,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            with_logits=True,
        )

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in order), with nothing new committed."""
        self._pending = (self.cache.get_seq_length(), 0)
        self.commit(torch.zeros_like(self.lengths), rows)

    def commit(self, keep: torch.Tensor, rows: torch.Tensor) -> None:
        """After :meth:`step`: row r committed its first ``keep[r]`` block tokens; only ``rows`` (indices,
        in order) go on decoding."""
        cache_len, _ = self._pending
        new_lengths = self.lengths + keep
        if rows.numel() == 0:
            self.lengths = new_lengths[rows]
            return
        if self.size == 1 and rows.numel() == 1 and int(self.lengths[0]) == cache_len:
            # Batch 1: drop the rejected tail (also trims sliding-window layers back to their window).
            self.cache.crop(int(new_lengths[0]) - self.cache.get_seq_length())
            self.lengths = new_lengths
            return
        old, new = self.lengths[rows], new_lengths[rows]
        i = torch.arange(int(new.max()), device=old.device)[None]
        # Row r keeps its committed prefix, then its kept block tokens (which sit at cache_len..).
        index = torch.where(i < old[:, None], i, cache_len + i - old[:, None])
        index = torch.where(i < new[:, None], index, torch.zeros_like(index))
        for layer in _packable_layers(self.cache):
            for attr in ("keys", "values"):
                x = getattr(layer, attr)[rows]
                idx = index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
                setattr(layer, attr, x.gather(2, idx))
        self.lengths = new
