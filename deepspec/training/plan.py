"""``train.dry_run=true``: print the resolved config and the plan of the run; load no model.

World size comes from the launcher's WORLD_SIZE (so ``WORLD_SIZE=64 python deepspec/train.py
recipe=qwen3 train.dry_run=true`` plans a 64-GPU run on a laptop). The number of training sequences is
read from the data source when that is cheap (no target is loaded); when it cannot be, the plan says so.
"""

from __future__ import annotations

import math
from typing import Optional

from deepspec.config import validate


def plan_batches(cfg, world_size: int) -> int:
    """Gradient-accumulation steps so that world × micro × accum = global batch."""
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if g <= 0 or m <= 0:
        raise ValueError(f"train.global_batch_size={g} and train.micro_batch_size={m} must be positive")
    if g % (world_size * m) != 0:
        raise ValueError(
            f"train.global_batch_size={g} is not divisible by world_size ({world_size}) × "
            f"train.micro_batch_size ({m}) = {world_size * m}"
        )
    return g // (world_size * m)


def total_steps(cfg, num_samples: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * num_samples / cfg.train.global_batch_size))


def _count_records(cfg) -> tuple[Optional[int], str]:
    try:
        from deepspec.training.setup import load_records

        n = len(load_records(cfg)["train"])
    except Exception as e:  # noqa: BLE001 - the plan still prints without the count
        return None, f"unknown until the data loads ({type(e).__name__}: {e})"
    if cfg.data.max_train_samples > 0:
        n = min(n, cfg.data.max_train_samples)
    return n, f"{n:,} records (before tokenisation drops unusable ones)"


def describe_plan(cfg) -> str:
    from deepspec.training.distributed import launcher_world_size, resolve_strategy
    from deepspec.training.optim import warmup_steps

    t = cfg.train
    validate(cfg)
    world = launcher_world_size()
    strategy = resolve_strategy(cfg)
    accum = plan_batches(cfg, world)
    n, n_text = (None, "not needed (train.max_steps is set)") if t.max_steps > 0 else _count_records(cfg)
    steps = total_steps(cfg, n) if (t.max_steps > 0 or n is not None) else None
    g, ml = t.global_batch_size, cfg.data.max_length
    lines = [
        "plan (dry run: nothing loaded, nothing written)",
        f"  launch            : {strategy}, world size {world} (WORLD_SIZE), mixed precision {t.mixed_precision}",
        f"  global batch      : {g} sequences = {world} rank(s) x {t.micro_batch_size} micro x {accum} accumulation",
        f"  train sequences   : {n_text}",
    ]
    if steps is None:
        lines.append(f"  optimizer steps   : ceil({t.epochs} epochs x N / {g}) once N is known")
    else:
        warm = warmup_steps(steps, t.warmup_ratio)
        epochs = steps * g / n if n else None
        lines += [
            f"  optimizer steps   : {steps:,}"
            + (f" ({epochs:.2f} epochs)" if epochs else "")
            + f", warm-up {warm:,}, then cosine to {t.min_lr_ratio} x lr {t.lr}",
            f"  micro-steps/rank  : {steps * accum:,} ({accum} per step)",
            f"  tokens            : <= {steps * g * ml:,} ({steps:,} x {g} x data.max_length {ml}; padded upper bound)",
            f"  blocks per step   : <= {g * cfg.data.num_anchors:,} ({g} x data.num_anchors "
            f"{cfg.data.num_anchors}) of block_size {cfg.model.block_size}",
        ]
        c = t.checkpoint
        n_ck = (steps // c.every if c.every > 0 else 0) + (
            1 if c.save_final and (c.every <= 0 or steps % c.every) else 0
        )
        lines.append(
            f"  checkpoints       : {n_ck} to {c.dir} (every {c.every or 'end only'}; keep last {c.keep_last}"
            f"{' + best held-out τ' if c.keep_best else ''}); resume={t.resume}"
        )
    lines.append(f"  outputs           : {t.output_dir}")
    return "\n".join(lines)


def dry_run(cfg) -> str:
    from deepspec.secrets import config_yaml

    text = config_yaml(cfg) + "\n" + describe_plan(cfg)
    print(text)
    return text
