"""Losses that train a drafter.

- :mod:`~deepspec.losses.objective`: the training objective (the weighted mix of CE, L1, confidence BCE
  and soft CE, slot decay, normalisation by the global weight sum) and the sums the metrics come from.
- :mod:`~deepspec.losses.vocab_terms`: the per-slot full-vocabulary terms (CE, soft CE, L1(q, p)),
  chunked and recomputed in backward (``loss.impl=lean``) or literal (``loss.impl=reference``).
"""

from deepspec.losses.objective import (
    LossOutput,
    acceptance_sums,
    dspark_loss,
    mix,
    summarise,
    target_logits,
    weighted_valid,
)
from deepspec.losses.vocab_terms import HeadLogits, block_row_stats, reference_row_stats

__all__ = [
    "HeadLogits",
    "LossOutput",
    "acceptance_sums",
    "block_row_stats",
    "dspark_loss",
    "mix",
    "reference_row_stats",
    "summarise",
    "target_logits",
    "weighted_valid",
]
