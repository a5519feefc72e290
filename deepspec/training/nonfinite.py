"""What a NaN or inf loss does: ``train.on_nonfinite=stop`` (default) or ``skip``.

The check runs on every micro-step *before* its backward, and every rank learns whether any rank saw
a bad loss, so all ranks take the same branch and no collective is left waiting.

- stop: raise before the bad loss reaches any gradient; the weights and optimizer state on disk are
  those of the last good checkpoint, which the error names.
- skip: the step's update is dropped (weights and AdamW moments unchanged); its data is consumed and
  the lr schedule advances, so the run stays aligned with the data order. The remaining micro-steps
  backpropagate a zero loss (DDP still expects every rank to reduce) — under DeepSpeed a NaN one
  instead, which its overflow check turns into a skipped step. After ``train.max_skipped_steps``
  skips the run stops.
"""

from __future__ import annotations

import logging

import torch

from deepspec.config import OnNonfinite, allowed, check_choice
from deepspec.training import distributed as dist_utils
from deepspec.training.faults import corrupt_loss

log = logging.getLogger("deepspec")

POLICIES = allowed(OnNonfinite)


class NonFiniteLossError(FloatingPointError):
    pass


class NonFiniteGuard:
    def __init__(self, cfg, acc, checkpointer) -> None:
        self.policy = cfg.train.on_nonfinite
        check_choice("train.on_nonfinite", self.policy, OnNonfinite)
        self.acc, self.ckpt = acc, checkpointer
        self.max_skips = cfg.train.max_skipped_steps
        self.skipped = 0
        self.kind = dist_utils.engine_kind(acc)
        if self.policy == "skip" and self.kind == "deepspeed":
            zopt = acc.deepspeed_engine_wrapped.engine.optimizer
            if dist_utils.zero_stage(acc) == 3 or not hasattr(zopt, "check_grad_overflow"):
                raise ValueError(
                    "train.on_nonfinite=skip needs DeepSpeed's overflow check, which ZeRO-3 runs only "
                    "in fp16; use train.on_nonfinite=stop with ZeRO-3"
                )
            zopt.check_grad_overflow = True  # drop a step whose gradients are not finite

    def _where(self) -> str:
        last = self.ckpt.last_good
        return f"last good checkpoint: {last}" if last is not None else "no checkpoint was written yet"

    def check(self, loss: torch.Tensor, step: int, micro: int) -> bool:
        """True (on every rank) if any rank's loss of this micro-step is not finite."""
        loss = corrupt_loss(loss, step + 1)
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        bad = dist_utils.any_rank(self.acc, local_bad)
        if bad and self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss at step {step + 1} (micro-batch {micro}"
                f"{', this rank' if local_bad else ', another rank'}); stopped before the update. {self._where()}. "
                "Resume with train.resume=auto after lowering train.lr, or set train.on_nonfinite=skip"
            )
        return bad

    def replacement(self, loss: torch.Tensor, model):
        """What to backpropagate instead of a step's losses once the step is bad (None = nothing)."""
        if self.kind == "deepspeed":
            return loss * float("nan")
        if self.kind == "ddp":
            return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        return None

    def skipped_step(self, step: int) -> None:
        self.skipped += 1
        if self.acc.is_main_process:
            log.warning("non-finite loss at step %d: update skipped (%d so far)", step + 1, self.skipped)
        if self.skipped > self.max_skips:
            raise NonFiniteLossError(
                f"{self.skipped} steps with a non-finite loss (train.max_skipped_steps="
                f"{self.max_skips}); last at step {step + 1}. {self._where()}"
            )
