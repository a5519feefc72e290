"""Launch modes: one Accelerator for single process, DDP, DeepSpeed ZeRO-2/3 and FSDP, on CPU or CUDA.

The strategy comes from the launcher (``accelerate launch --config_file configs/accelerate/<mode>.yaml``
sets ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP) or from ``train.strategy`` (for ``torchrun``).
Only the drafter is prepared: the frozen target stays an ordinary module on every rank.
Moving full weights / optimizer state in and out of an engine is in engine_state.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import List

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from deepspec.config import MixedPrecision, Strategy, allowed, check_choice

log = logging.getLogger("deepspec")

STRATEGIES = allowed(Strategy)
REPO_ROOT = Path(__file__).resolve().parents[2]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launcher_world_size() -> int:
    """Processes started by the launcher (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(cfg) -> str:
    s = cfg.train.strategy
    check_choice("train.strategy", s, Strategy)
    world = launcher_world_size()
    if s == "auto":
        if _env_flag("ACCELERATE_USE_DEEPSPEED"):
            return "deepspeed"
        if _env_flag("ACCELERATE_USE_FSDP"):
            return "fsdp"
        return "ddp" if world > 1 else "single"
    if s == "single" and world > 1:
        raise ValueError(f"train.strategy=single but the launcher started {world} processes")
    return s


# ----------------------------------------------------------------------------- DeepSpeed config
def deepspeed_config(cfg, world_size: int, accum: int) -> dict:
    """The DeepSpeed json with its batch, accumulation, clipping and precision entries filled from cfg.

    "auto" entries are filled; an entry the json sets explicitly must agree with the training config.
    """
    path = cfg.train.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path:
        # An accelerate yaml with inline DeepSpeed settings instead of a json: take its ZeRO stage.
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        path = str(REPO_ROOT / "configs" / "deepspeed" / f"zero{stage}.json")
        if os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") not in ("none", ""):
            log.warning(
                "inline accelerate DeepSpeed options other than zero_stage are ignored; put offloading "
                "into a DeepSpeed json (train.deepspeed_config or deepspeed_config_file)"
            )
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (REPO_ROOT / p).is_file():
        p = REPO_ROOT / p  # the shipped configs, launched from another working directory
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path!r} (train.deepspeed_config) does not exist")
    ds = json.loads(p.read_text())
    t = cfg.train
    want = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": float(t.grad_clip),
    }
    for key, value in want.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif float(have) != float(value):
            raise ValueError(
                f"{path}: {key}={have} disagrees with the training config ({value}, from train.global_batch_size="
                f"{t.global_batch_size}, train.micro_batch_size={t.micro_batch_size}, world size {world_size}, "
                f'train.grad_clip={t.grad_clip}); set it to "auto"'
            )
    bf16 = t.mixed_precision == "bf16"
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{path}: fp16 is not supported; use train.mixed_precision=bf16")
    ds["zero_allow_untested_optimizer"] = True  # our AdamW is torch's own
    if int(ds.get("zero_optimization", {}).get("stage", 0)) == 3 and t.on_nonfinite == "skip":
        raise ValueError(
            "train.on_nonfinite=skip needs DeepSpeed's overflow check, which ZeRO-3 runs only in fp16; "
            f"use train.on_nonfinite=stop with {path}"
        )
    return ds


# ----------------------------------------------------------------------------- accelerator
def fsdp_plugin():
    """FSDP2 over the drafter only, one shard unit: the whole drafter. Every drafter uses a layer's weights
    outside that layer's forward (the parallel drafter projects the context's keys/values, EAGLE-3 unrolls
    its layer step by step), where a separately sharded layer would not have gathered them; and a
    drafter's memory is mostly the frozen embedding / lm_head, which sit in the root unit anyway."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="no_wrap",
        reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )


def make_accelerator(cfg, strategy: str, accum: int) -> Accelerator:
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    world = launcher_world_size()
    kwargs: dict = {}
    handlers = []
    if strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world, accum))
        if not cuda:
            # accelerate only picks a process-group backend for GPUs unless cpu=True, which would
            # turn DeepSpeed off; give it gloo explicitly.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    elif strategy == "fsdp":
        if not cuda:
            raise ValueError(
                "train.strategy=fsdp needs CUDA (accelerate runs FSDP on GPUs only); on CPU use ddp or deepspeed"
            )
        if not _env_flag("ACCELERATE_USE_FSDP"):
            kwargs["fsdp_plugin"] = fsdp_plugin()
    check_choice("train.mixed_precision", cfg.train.mixed_precision, MixedPrecision)
    acc = Accelerator(
        mixed_precision=str(cfg.train.mixed_precision),
        cpu=not cuda and strategy != "deepspeed",
        gradient_accumulation_steps=accum,
        kwargs_handlers=handlers,
        **kwargs,
    )
    if acc.num_processes != world:
        raise RuntimeError(f"accelerate sees {acc.num_processes} processes but the launcher started {world}")
    if (
        strategy == "ddp"
        and world > 1
        and acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    ):
        raise ValueError(f"train.strategy=ddp but the launcher configured {acc.distributed_type}")
    return acc


def engine_kind(acc: Accelerator) -> str:
    t = acc.distributed_type
    if t == DistributedType.DEEPSPEED:
        return "deepspeed"
    if t == DistributedType.FSDP:
        return "fsdp"
    return "single" if acc.num_processes == 1 else "ddp"


def zero_stage(acc: Accelerator) -> int:
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return -1
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def bf16_autocast(acc: Accelerator, mixed_precision: str):
    """bf16 autocast around the drafter forward. Under DeepSpeed the weights themselves are bf16 (fp32
    masters live in the ZeRO optimizer) and accelerate's autocast is a no-op, so inputs (fp32 target
    features) are cast by torch's autocast instead."""
    if mixed_precision == "bf16" and acc.distributed_type == DistributedType.DEEPSPEED:
        return torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)
    return acc.autocast()


@contextlib.contextmanager
def grad_sync(acc: Accelerator, model, sync: bool):
    """Micro-step context: gradients are reduced (and DeepSpeed steps) only on the last micro-step."""
    acc.sync_gradients = sync
    with contextlib.nullcontext() if sync else acc.no_sync(model):
        yield


def set_lr(scheduler) -> None:
    """After loading a scheduler's state, put its current lr into the optimizer's groups."""
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def gather_objects(acc: Accelerator, obj) -> List:
    """Every rank's ``obj`` on the main process (a one-element list elsewhere)."""
    if acc.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * acc.num_processes if acc.is_main_process else None
    dist.gather_object(obj, out, dst=0)
    return out if acc.is_main_process else [obj]


def any_rank(acc: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, "sum").item() > 0)


@contextlib.contextmanager
def frozen_target_outside_deepspeed():
    """Under a ZeRO-3 config, transformers' from_pretrained would build models inside
    ``deepspeed.zero.Init`` and shard them. The frozen target must stay whole on every rank, so the
    target (and everything else built in setup) is loaded with that hook switched off."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved
