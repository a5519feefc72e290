"""Full (unsharded, fp32) trainable weights and AdamW moments in and out of whichever engine holds them
(plain module, DDP, DeepSpeed ZeRO-1/2/3, FSDP2 DTensors), keyed by parameter name. Checkpoints
built on this do not depend on the world size or the engine that wrote them.

Under DeepSpeed the fp32 master weights and moments live in ZeRO's flat partitions; they are read and
written through DeepSpeed's tensor-fragment API (safe_get/set_full_*). Under FSDP2 parameters and
moments are DTensors; they are gathered with full_tensor() and re-sharded with distribute_tensor().
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from deepspec.models import build_drafter
from deepspec.training.distributed import engine_kind, zero_stage

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def named_trainable(acc: Accelerator, model) -> List[Tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32).contiguous()


def _ds_utils():
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    return (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )


def _ds_managed(acc: Accelerator, p) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED and (
        hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")
    )


def full_weights(acc: Accelerator, model) -> Dict[str, torch.Tensor]:
    """fp32 CPU copies of every trainable weight (the master copy where an engine keeps one), on the
    main process ({} elsewhere). Collective under DeepSpeed / FSDP: every rank must call it. Tensors
    are gathered one at a time, so no rank holds more than one full tensor it does not keep."""
    out = {}
    keep = acc.is_main_process
    get_fp32 = _ds_utils()[0] if acc.distributed_type == DistributedType.DEEPSPEED else None
    for name, p in named_trainable(acc, model):
        if get_fp32 is not None and _ds_managed(acc, p):
            t = get_fp32(p)  # collective
        elif _is_dtensor(p) or keep:
            t = p
        else:
            continue
        t = _full(t)  # collective for DTensors
        if keep:
            out[name] = t
    return out


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # AcceleratedOptimizer -> torch optimizer


def full_optimizer_state(acc: Accelerator, model, optimizer) -> Tuple[Dict[str, torch.Tensor], int]:
    """({"exp_avg.<name>": t, "exp_avg_sq.<name>": t}, AdamW step) as full fp32 CPU tensors on the main
    process ({} elsewhere). Collective like :func:`full_weights`."""
    tensors: Dict[str, torch.Tensor] = {}
    keep = acc.is_main_process
    named = named_trainable(acc, model)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        get_state = _ds_utils()[1]
        inner = _torch_optimizer(acc.deepspeed_engine_wrapped.engine.optimizer)
        steps = {int(float(s["step"])) for s in inner.state.values() if "step" in s}
        for name, p in named:
            for key in ADAM_KEYS:
                v = get_state(p, key) if inner.state else None  # collective
                if keep:
                    shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
                    tensors[f"{key}.{name}"] = _full(v) if v is not None else torch.zeros(shape)
    else:
        opt = _torch_optimizer(optimizer)
        steps = set()
        for name, p in named:
            st = opt.state.get(p, {})
            if "step" in st:
                steps.add(int(float(st["step"])))
            for key in ADAM_KEYS:
                if key in st and (keep or _is_dtensor(st[key])):
                    t = _full(st[key])  # collective for DTensors
                elif keep:
                    t = torch.zeros(tuple(p.shape))
                else:
                    continue
                if keep:
                    tensors[f"{key}.{name}"] = t
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
                _ds_set(acc, p, tensors[name], None, set_fp32)
        return
    with torch.no_grad():
        for name, p in named:
            _copy_into(p, tensors[name])


def _ds_set(acc: Accelerator, p, full: torch.Tensor, key, public_setter) -> None:
    """Write a full fp32 tensor (the master weight if key is None, else an AdamW moment) into DeepSpeed's
    partitions. ZeRO-3's own setter cannot write a parameter whose size does not divide by the world
    size (its last partition is padded), so ZeRO-3 partitions are written here, padding left alone."""
    if not hasattr(p, "ds_id"):
        if key is None:
            public_setter(p, full.to(acc.device))
        else:
            public_setter(p, full.to(acc.device), key)
        return
    z3 = p._z3_optimizer
    part, group = z3._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), z3._get_param_partition_rank(p)
    chunk = full.flatten()[rank * n : (rank + 1) * n]
    part.data[: chunk.numel()].copy_(chunk.to(part.device, part.dtype))
    if z3._swappable_optimizer_subgroup(group):
        z3._optimizer_states_and_gradient_swap_out(group)


def _copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        dst.copy_(distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements))
    else:
        dst.copy_(full.to(dst.device, dst.dtype))


def _like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """An AdamW state tensor for parameter ``p`` (same dtype, device and sharding as ``p``)."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements)
    return full.to(p.device, p.dtype).clone()


def load_full_optimizer_state(
    acc: Accelerator, model, optimizer, tensors: Dict[str, torch.Tensor], step: int
) -> None:
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
        # ZeRO-3 swaps each sub-group's partition into the optimizer's param group only while stepping,
        # so its partitions are listed from the ZeRO optimizer itself.
        flats = (
            getattr(zopt, "fp32_partitioned_groups_flat", None)
            or getattr(zopt, "single_partition_of_fp32_groups", None)
            or [f for group in inner.param_groups for f in group["params"]]
        )
        for flat in flats:
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
                    _ds_set(acc, p, tensors[f"{key}.{name}"], key, set_state)
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


def final_drafter(acc: Accelerator, run, model):
    """A plain, unsharded fp32 drafter for export and evaluation on the main process (None elsewhere).
    Collective under DeepSpeed / FSDP."""
    if engine_kind(acc) in ("single", "ddp"):
        return acc.unwrap_model(model) if acc.is_main_process else None
    weights = full_weights(acc, model)
    # before the main-process branch: a sharded target gathers these on every rank
    embed, head = run.target.embed_tokens.weight, run.target.lm_head.weight
    if not acc.is_main_process:
        return None
    drafter = build_drafter(run.drafter_config)
    if run.draft_ids is not None:
        drafter.set_draft_vocab(run.draft_ids.cpu())
    drafter.load_target_head(embed, head)
    missing, unexpected = drafter.load_state_dict(weights, strict=False)
    frozen = {n for n, p in drafter.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(
            f"gathered weights do not fit the drafter: missing {sorted(set(missing) - frozen)}, "
            f"unexpected {sorted(unexpected)}"
        )
    return drafter.to(acc.device)
