"""``target.shard=fsdp``: the frozen target's weights sharded over the ranks of online training.

Each decoder layer is one FSDP2 unit (``fully_shard``), so are an untied embedding and lm_head, and
the rest of the model (final norm, a tied embedding / lm_head) is the root unit, so a rank keeps about 1/world of every weight and all-gathers one
layer at a time during a forward, freeing it right after (``reshard_after_forward=True``, also for
the root, whose automatic setting would keep it gathered for a backward that never comes). The
layer hooks of :class:`~deepspec.target.adapter.TargetModel` still fire: they see the layer
outputs, which are whole on every rank. Training builds the sharded target with
:func:`deepspec.target.shard_load.load_sharded_target`, so no rank ever holds the whole target: each
reads only its own rows of every weight from the safetensors files.

Outside a forward the loss reads the lm_head weight and the final export reads the embedding; the
views returned by :func:`gathered` all-gather them on the spot. Every gather is a collective: all
ranks run the same target forwards and the same loss calls, which online training does (held-out
scoring included). What cannot be done is a forward on one rank alone, which is why the
end-of-training evaluation (main process only) is refused with a sharded target.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

KEY = "target.shard"


def check_target_shard(cfg, world_size: int) -> None:
    """Start-up check of ``target.shard`` for a training run; raises ConfigError naming the key."""
    from deepspec.config import ConfigError

    mode = str(getattr(cfg.target, "shard", "none"))
    if mode == "none":
        return
    if world_size < 2:
        raise ConfigError(
            f"{KEY}={mode} needs 2 or more processes (launched with torchrun or accelerate launch); this "
            f"run has {world_size}. Use {KEY}=none on a single process"
        )
    if str(cfg.data.source) == "cache":
        raise ConfigError(
            f"{KEY}={mode} with data.source=cache: features come from the offline cache, no target runs per "
            f"batch, so there is nothing to shard; use {KEY}=none"
        )
    if cfg.eval.enabled:
        raise ConfigError(
            f"{KEY}={mode} with eval.enabled=true: the end-of-training evaluation decodes on the main process "
            "alone, which a sharded target cannot serve. Set eval.enabled=false and evaluate the exported "
            f"drafter with deepspec/evaluate.py (or train with {KEY}=none)"
        )


def refuse_target_shard(cfg, stage: str) -> None:
    """Stages other than online training run the target unsharded: a set ``target.shard`` is an error."""
    from deepspec.config import ConfigError

    mode = str(getattr(getattr(cfg, "target", None), "shard", "none"))
    if mode != "none":
        raise ConfigError(
            f"{KEY}={mode}: {stage} runs the whole target on each process; sharding applies to online "
            f"training (deepspec/train.py) only. Use {KEY}=none"
        )


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class GatheredLinear:
    """A sharded ``nn.Linear`` / ``nn.Embedding`` seen whole: ``.weight`` all-gathers (collective)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def weight(self) -> torch.Tensor:
        return _full(self.module.weight.detach())

    @property
    def bias(self) -> Optional[torch.Tensor]:
        b = getattr(self.module, "bias", None)
        return None if b is None else _full(b.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, nn.Embedding):
            return F.embedding(x, self.weight)
        return F.linear(x, self.weight, self.bias)


def shard_target(target, device_type: Optional[str] = None) -> None:
    """Shard ``target`` (a TargetModel) in place over the default process group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{KEY}=fsdp: no process group; launch with torchrun or accelerate launch")
    device_type = device_type or target.device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in target.decoder.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        # Untied, each is a unit of its own: a forward then holds at most one V x H matrix whole (in the
        # root unit both would stay gathered from the embedding lookup to the logits).
        fully_shard(embed, mesh=mesh, reshard_after_forward=True)
        fully_shard(head, mesh=mesh, reshard_after_forward=True)
    fully_shard(target.model, mesh=mesh, reshard_after_forward=True)
    target.sharded = True


def gathered(module: nn.Module, sharded: bool):
    return GatheredLinear(module) if sharded else module


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameters this rank holds: a shard's local part, not its global size."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in module.parameters():
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.data_ptr() in seen and local.numel():
            continue
        seen.add(local.data_ptr())
        total += local.numel() * local.element_size()
    return total
