"""Drafters. :func:`build_drafter` is the one place a config becomes a model."""

from __future__ import annotations

from deepspec.models.config import DSparkConfig


def build_drafter(config: DSparkConfig):
    """The drafter a :class:`DSparkConfig` describes: DSpark/DFlash (parallel block) or EAGLE-3.

    Every drafter has ``forward(target_feats, input_ids, anchors, prev_tokens) -> BlockOutput`` and
    ``draft(target_feats, anchor_token, temperature, generator, forced_tokens, context_ids) -> Draft``.
    """
    if config.architecture == "eagle3":
        from deepspec.models.eagle3 import Eagle3Drafter

        return Eagle3Drafter(config)
    from deepspec.models.drafter import DSparkDrafter

    return DSparkDrafter(config)
