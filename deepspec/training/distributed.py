"""Launch modes: one Accelerator for single process, DDP, DeepSpeed ZeRO-2/3 and FSDP, on CPU or CUDA.

The strategy comes from the launcher (``accelerate launch --config_file configs/accelerate/<mode>.yaml``
sets ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP) or from ``train.strategy`` (for ``torchrun``).
Only the drafter is prepared: the frozen target stays an ordinary module on every rank.

The rest of this module moves *full* (unsharded, fp32) trainable weights and AdamW moments in and out
of whichever engine holds them, keyed by parameter name. Checkpoints therefore do not depend on the
world size or the engine that wrote them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

log = logging.getLogger("deepspec")

STRATEGIES = ("auto", "single", "ddp", "deepspeed", "fsdp")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEEPSPEED_CONFIG = REPO_ROOT / "configs" / "deepspeed" / "zero2.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launcher_world_size() -> int:
    """Processes started by the launcher (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_strategy(cfg) -> str:
    s = cfg.train.strategy
    if s not in STRATEGIES:
        raise ValueError(f"train.strategy={s!r} is unknown; expected one of {STRATEGIES}")
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
    path = cfg.train.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or str(DEFAULT_DEEPSPEED_CONFIG)
    p = Path(path)
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
                f"train.grad_clip={t.grad_clip}); set it to \"auto\""
            )
    bf16 = t.mixed_precision == "bf16"
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    if ds.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{path}: fp16 is not supported; use train.mixed_precision=bf16")
    ds["zero_allow_untested_optimizer"] = True  # our AdamW is torch's own
    return ds


# ----------------------------------------------------------------------------- accelerator
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
            raise ValueError("train.strategy=fsdp needs CUDA (accelerate runs FSDP on GPUs only); on CPU use ddp or deepspeed")
        if not _env_flag("ACCELERATE_USE_FSDP"):
            from accelerate.utils import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=["DrafterLayer"],
                reshard_after_forward=True,
                state_dict_type="FULL_STATE_DICT",
                cpu_ram_efficient_loading=False,
            )
    if cfg.train.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"train.mixed_precision={cfg.train.mixed_precision!r}: expected 'no' or 'bf16'")
    acc = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        cpu=not cuda and strategy != "deepspeed",
        gradient_accumulation_steps=accum,
        kwargs_handlers=handlers,
        **kwargs,
    )
    if acc.num_processes != world:
        raise RuntimeError(f"accelerate sees {acc.num_processes} processes but the launcher started {world}")
    if strategy == "ddp" and world > 1 and acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
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


# ----------------------------------------------------------------------------- full state in / out
def named_trainable(acc: Accelerator, model) -> List[Tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).contiguous()


def _ds_utils():
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                 safe_set_full_fp32_param, safe_set_full_optimizer_state)

    return safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state


def _ds_managed(acc: Accelerator, p) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED and (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"))


def full_weights(acc: Accelerator, model) -> Dict[str, torch.Tensor]:
    """fp32 CPU copies of every trainable weight (the master copy where an engine keeps one).
    Collective under DeepSpeed / FSDP: every rank must call it."""
    out = {}
    get_fp32 = _ds_utils()[0] if acc.distributed_type == DistributedType.DEEPSPEED else None
    for name, p in named_trainable(acc, model):
        if get_fp32 is not None and _ds_managed(acc, p):
            out[name] = _full(get_fp32(p))
        else:
            out[name] = _full(p)
    return out


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer -> torch optimizer


def full_optimizer_state(acc: Accelerator, model, optimizer) -> Tuple[Dict[str, torch.Tensor], int]:
    """({"exp_avg.<name>": t, "exp_avg_sq.<name>": t}, adam step) as full fp32 CPU tensors. Collective."""
    tensors: Dict[str, torch.Tensor] = {}
    named = named_trainable(acc, model)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        get_state = _ds_utils()[1]
        inner = _torch_optimizer(acc.deepspeed_engine_wrapped.engine.optimizer)
        steps = {int(float(s["step"])) for s in inner.state.values() if "step" in s}
        for name, p in named:
            for key in ADAM_KEYS:
                v = get_state(p, key) if inner.state else None
                tensors[f"{key}.{name}"] = _full(v) if v is not None else torch.zeros(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
    else:
        opt = _torch_optimizer(optimizer)
        steps = set()
        for name, p in named:
            st = opt.state.get(p, {})
            if "step" in st:
                steps.add(int(float(st["step"])))
            for key in ADAM_KEYS:
                tensors[f"{key}.{name}"] = _full(st[key]) if key in st else torch.zeros(tuple(p.shape))
    if len(steps) > 1:
        raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(steps)}")
    return tensors, (steps.pop() if steps else 0)


def load_full_weights(acc: Accelerator, model, tensors: Dict[str, torch.Tensor]) -> None:
    """Copy full fp32 weights (by name) into the model and, under DeepSpeed, into its fp32 masters."""
    named = named_trainable(acc, model)
    _check_names("model.safetensors", {n for n, _ in named}, set(tensors))
    if acc.distributed_type == DistributedType.DEEPSPEED:
        set_fp32 = _ds_utils()[2]
        params = [p for _, p in named]
        if zero_stage(acc) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if acc.process_index == 0:
                    with torch.no_grad():
                        for name, p in named:
                            p.copy_(tensors[name].to(p.device, p.dtype))
        else:
            with torch.no_grad():
                for name, p in named:
                    p.copy_(tensors[name].to(p.device, p.dtype))
        for name, p in named:
            if _ds_managed(acc, p):
                set_fp32(p, tensors[name].to(acc.device))
        return
    with torch.no_grad():
        for name, p in named:
            _copy_into(p, tensors[name])


def _copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        dst.copy_(distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(torch.float32), p.device_mesh, p.placements)
    return full.to(p.device, torch.float32 if p.dtype != torch.float32 else p.dtype).clone()


def load_full_optimizer_state(acc: Accelerator, model, optimizer, tensors: Dict[str, torch.Tensor], step: int) -> None:
    """Install AdamW moments (full, by name) and the step count into whichever optimizer the engine runs."""
    named = named_trainable(acc, model)
    expected = {f"{k}.{n}" for n, _ in named for k in ADAM_KEYS}
    _check_names("optimizer.safetensors", expected, set(tensors))
    if acc.distributed_type == DistributedType.DEEPSPEED:
        _, _, _, set_state = _ds_utils()
        zopt = acc.deepspeed_engine_wrapped.engine.optimizer
        inner = _torch_optimizer(zopt)
        # AdamW creates its state lazily at the first step; create it now over DeepSpeed's flat fp32
        # partitions so the per-parameter fragments can be linked and filled.
        for group in inner.param_groups:
            for flat in group["params"]:
                st = inner.state[flat]
                st["step"] = torch.tensor(float(step), dtype=torch.float32)
                for key in ADAM_KEYS:
                    if key not in st:
                        st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        if hasattr(zopt, "_hp_optimizer_states_linked"):  # ZeRO-1/2: link fragments to the new state
            zopt._hp_optimizer_states_linked = False
            zopt._lazy_init_hp_params_optimizer_state()
        for name, p in named:
            if _ds_managed(acc, p):
                for key in ADAM_KEYS:
                    set_state(p, tensors[f"{key}.{name}"].to(acc.device), key)
        return
    opt = _torch_optimizer(optimizer)
    for name, p in named:
        opt.state[p] = {
            "step": torch.tensor(float(step), dtype=torch.float32),
            **{key: _like(p, tensors[f"{key}.{name}"]) for key in ADAM_KEYS},
        }


def _check_names(what: str, expected: set, found: set) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        raise ValueError(
            f"checkpoint {what} does not match this drafter: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )


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


def final_drafter(acc: Accelerator, run, model):
    """A plain, unsharded fp32 drafter for export and evaluation on the main process (None elsewhere).
    Collective under DeepSpeed / FSDP."""
    if engine_kind(acc) in ("single", "ddp"):
        return acc.unwrap_model(model) if acc.is_main_process else None
    weights = full_weights(acc, model)
    if not acc.is_main_process:
        return None
    from deepspec.models.drafter import DSparkDrafter

    drafter = DSparkDrafter(run.drafter_config)
    drafter.load_target_head(run.target.embed_tokens.weight, run.target.lm_head.weight)
    missing, unexpected = drafter.load_state_dict(weights, strict=False)
    frozen = {n for n, p in drafter.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"gathered weights do not fit the drafter: missing {sorted(set(missing) - frozen)}, "
                           f"unexpected {sorted(unexpected)}")
    return drafter.to(acc.device)
