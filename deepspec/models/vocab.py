"""The draft vocabulary: which target tokens a pruned drafter can propose, and the maps between the two.

``model.draft_vocab_size=d`` (0 = the target's whole vocabulary) keeps the d target tokens most often
seen as training labels (the loss-masked answer tokens), always including the tokens decoding needs
(:func:`always_kept_ids`). Draft id i stands for target id ``draft_ids[i]``; the ids are kept in
ascending target order, so the maps are the ones vLLM's DSpark/EAGLE-3 loaders read:

- ``d2t``: int64 [d], an *offset*: target id = i + d2t[i].
- ``t2d``: bool [V], True where the target token is in the draft vocabulary (training-time only;
  engines ignore it).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch


def always_kept_ids(
    tokenizer, target_config: Optional[dict] = None, mask_token_id: Optional[int] = None
) -> List[int]:
    """The tokens a draft vocabulary always keeps: the tokenizer's special tokens (EOS, end of turn,
    BOS, pad, ...) and every EOS id of the target's config (generation stops on them), but not the
    mask token (an input only, never a label)."""
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for src in (tokenizer, target_config or {}):
        eos = src.get("eos_token_id") if isinstance(src, dict) else getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    ids.discard(mask_token_id)
    return sorted(ids)


def answer_token_counts(examples: Iterable, vocab_size: int) -> torch.Tensor:
    """How often each target token is a training label (a loss-masked token) in ``examples``: int64 [V]."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ex in examples:
        ids = torch.as_tensor(ex.input_ids, dtype=torch.long)
        mask = torch.as_tensor(ex.loss_mask, dtype=torch.bool)
        counts += torch.bincount(ids[mask], minlength=vocab_size)[:vocab_size]
    return counts


def select_draft_ids(
    counts: torch.Tensor, d: int, keep: Sequence[int], key: str = "model.draft_vocab_size"
) -> torch.Tensor:
    """The ``d`` target ids of the draft vocabulary (ascending): ``keep`` plus the most frequent others.

    Ties are broken by the lower id, so the choice is deterministic.
    """
    v = counts.numel()
    keep = sorted({int(k) for k in keep if 0 <= int(k) < v})
    if not 1 <= d <= v:
        raise ValueError(f"{key}={d} is outside [1, {v}] (the target's vocabulary has {v} tokens)")
    if d < len(keep):
        raise ValueError(
            f"{key}={d} is smaller than the {len(keep)} special tokens decoding needs (EOS, end of turn, ...: "
            f"ids {keep[:8]}{'...' if len(keep) > 8 else ''}); expected at least {len(keep)}"
        )
    score = counts.double().clone()
    # Stable descending sort by count, then by id: kept tokens first.
    score[keep] = float("inf")
    order = torch.sort(-score, stable=True).indices[:d]
    return torch.sort(order).values


def maps_from_ids(draft_ids: torch.Tensor, vocab_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d2t offsets int64 [d], t2d bool mask [V]) for ascending target ids ``draft_ids``."""
    ids = draft_ids.long()
    d2t = ids - torch.arange(ids.numel(), dtype=torch.long, device=ids.device)
    t2d = torch.zeros(vocab_size, dtype=torch.bool, device=ids.device)
    t2d[ids] = True
    return d2t, t2d


def ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    return torch.arange(d2t.numel(), dtype=torch.long, device=d2t.device) + d2t.long()


def check_maps(d2t: torch.Tensor, t2d: torch.Tensor, vocab_size: int, where: str = "drafter") -> None:
    """Stop with a clear error when the maps do not describe a draft vocabulary of a ``vocab_size`` target."""
    if t2d.numel() != vocab_size:
        raise ValueError(
            f"{where}: its draft vocabulary maps a {t2d.numel()}-token target vocabulary (t2d), but the "
            f"target has {vocab_size} tokens; pair the drafter with the target it was trained against"
        )
    ids = ids_from_d2t(d2t)
    bad = (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size)) or (
        ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all())
    )
    if bad or int(t2d.sum()) != ids.numel() or not bool(t2d[ids.clamp(0, vocab_size - 1)].all()):
        raise ValueError(
            f"{where}: d2t and t2d disagree or name ids outside the target's {vocab_size}-token vocabulary "
            "(d2t must give ascending target ids i + d2t[i]; t2d must be True exactly there)"
        )


def target_to_draft_index(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [V]: the draft id of each target token, -1 where it is not in the draft vocabulary."""
    idx = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_ids.device)
    idx[draft_ids] = torch.arange(draft_ids.numel(), dtype=torch.long, device=draft_ids.device)
    return idx
