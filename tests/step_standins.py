"""Stand-ins for one optimizer step (training/loop.py:train_step) without a target, data or launcher:
a one-process accelerator, a one-weight model whose loss is Σ w·θ·x, and micro-batches of (x, w)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace
from typing import Optional

import torch
from accelerate.utils import DistributedType

from deepspec.losses import LossOutput
from deepspec.training.loop import StepParts
from deepspec.training.nonfinite import NonFiniteGuard


class OneProcess:
    """accelerate.Accelerator as train_step, NonFiniteGuard and finish_run use it: one CPU process."""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")
    distributed_type = DistributedType.NO
    sync_gradients = True

    def __init__(self, accum: int = 1) -> None:
        self.gradient_accumulation_steps = accum

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def backward(self, loss) -> None:
        (loss / self.gradient_accumulation_steps).backward()  # what accelerate does outside DeepSpeed

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model


def micro(xs, ws, nan: bool = False) -> SimpleNamespace:
    """A micro-batch: inputs x, slot weights w (their sum is the batch's weight), one token per x."""
    x = torch.tensor(xs, dtype=torch.float32)
    return SimpleNamespace(
        x=x, w=torch.tensor(ws, dtype=torch.float32), attention_mask=torch.ones_like(x), nan=nan
    )


def weighted_loss(model, batch, denominator) -> LossOutput:
    """Σ w·θ·x over the micro-batch, divided by the denominator (like the drafter loss); NaN if asked."""
    total = (batch.w * model(batch.x[:, None]).squeeze(-1)).sum()
    if batch.nan:
        total = total * float("nan")
    return LossOutput(loss=total / denominator, sums={"ce": total.detach(), "weight": batch.w.sum()})


def step_parts(
    optimizer: str = "sgd",
    lr: float = 0.1,
    policy: str = "stop",
    max_skips: int = 1,
    grad_clip: float = 0.0,
    accum: int = 1,
    last_good: Optional[str] = None,
) -> StepParts:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    opt = opt_cls(model.parameters(), lr=lr)
    cfg = SimpleNamespace(train=SimpleNamespace(on_nonfinite=policy, max_skipped_steps=max_skips))
    acc = OneProcess(accum)
    return StepParts(
        acc=acc,
        model=model,
        optimizer=opt,
        scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)),
        guard=NonFiniteGuard(cfg, acc, SimpleNamespace(last_good=last_good)),
        loss=weighted_loss,
        weight_sum=lambda batches: sum(b.w.sum() for b in batches),
        grad_clip=grad_clip,
        mixed_precision="no",
    )


def theta(parts: StepParts) -> float:
    return float(parts.model.weight.detach()[0, 0])
