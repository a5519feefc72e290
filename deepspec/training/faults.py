"""Fault injection for the interruption tests (docs/training.md, "Testing hooks").

``DEEPSPEC_FAULTS`` is a comma-separated list of ``point@step``; nothing happens when it is unset.
Points: ``kill_after_checkpoint`` (SIGKILL right after checkpoint <step> is complete),
``kill_in_checkpoint`` (SIGKILL half-way through writing checkpoint <step>), ``nan_loss`` (the loss of
step <step> becomes NaN on every rank).
"""

from __future__ import annotations

import os
import signal


def _armed(point: str, step: int) -> bool:
    spec = os.environ.get("DEEPSPEC_FAULTS", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, at = item.partition("@")
        if name == point and at and int(at) == step:
            return True
    return False


def maybe_kill(point: str, step: int) -> None:
    if _armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_loss(loss, step: int):
    return loss * float("nan") if _armed("nan_loss", step) else loss
