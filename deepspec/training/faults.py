"""Fault injection for the interruption tests (docs/training.md, "Testing hooks").

``DEEPSPEC_FAULTS`` is a comma-separated list of ``point@N``; nothing happens when it is unset.
Each kill point is a SIGKILL at one write of a command (tests/test_fault_injection.py kills at each
and checks the rerun ends exactly like an uninterrupted run; docs/guarantees.md):

- train: ``kill_after_commit@0`` (config.yaml / run_info.json written, nothing trained),
  ``kill_after_metrics@N`` (metrics.jsonl line of step N written), ``kill_in_checkpoint@N`` (half-way
  through writing checkpoint N), ``kill_after_checkpoint@N``, ``kill_after_drafter@0`` (drafter/ saved,
  before evaluation, export and train_summary.json);
- export (also the one after training): ``kill_in_export@0`` (staged folder complete, not yet in
  place), ``kill_in_export_swap@0`` (the previous export moved aside, the new one not yet in place);
- collect: ``kill_in_shard@K`` (shard K's temp file written), ``kill_before_sidecar@K`` (shard K in
  place, its sidecar not), ``kill_before_manifest@0``;
- regenerate: ``kill_in_record@N`` (half of output line N written), ``kill_after_record@N``.

``nan_loss@N`` makes the loss of step N NaN on every rank.
"""

from __future__ import annotations

import os
import signal


def armed(point: str, step: int) -> bool:
    spec = os.environ.get("DEEPSPEC_FAULTS", "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, at = item.partition("@")
        if name == point and at and int(at) == step:
            return True
    return False


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_loss(loss, step: int):
    return loss * float("nan") if armed("nan_loss", step) else loss
