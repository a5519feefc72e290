"""Drafters. :func:`build_drafter` is the one place a :class:`DrafterSpec` becomes a model."""

from __future__ import annotations

from typing import Dict, Type

from deepspec.models.base import Drafter
from deepspec.models.config import DrafterSpec
from deepspec.models.eagle3 import Eagle3Drafter
from deepspec.models.parallel import ParallelDrafter

# model.kind -> the class that implements it (DFlash is the parallel drafter with both heads off).
DRAFTER_CLASSES: Dict[str, Type[Drafter]] = {
    "dspark": ParallelDrafter,
    "dflash": ParallelDrafter,
    "eagle3": Eagle3Drafter,
}


def build_drafter(spec: DrafterSpec) -> Drafter:
    """The drafter ``spec`` describes, with uninitialised trainable weights (call ``init_weights`` or
    load a state dict). Works under ``torch.device("meta")`` to get shapes without memory."""
    return DRAFTER_CLASSES[spec.kind](spec)


__all__ = ["Drafter", "DrafterSpec", "Eagle3Drafter", "ParallelDrafter", "build_drafter"]
