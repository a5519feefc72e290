"""Online distillation: the frozen target computes features per batch, the drafter learns from them.

Read top to bottom: set up -> for each optimizer step: micro-batches (target forward, drafter
forward, loss, backward) -> clip, step, log -> export -> evaluate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from deepspec.data.anchors import block_targets, slot_weights
from deepspec.data.batching import Batch, collate, global_indices
from deepspec.exporting.native import atomic_write_text, save_native
from deepspec.losses import dspark_loss, target_logits
from deepspec.training.optim import build_optimizer, build_scheduler
from deepspec.training.setup import RunSetup, build_run


def plan_batches(cfg, world_size: int) -> int:
    """Gradient-accumulation steps so that world × micro × accum = global batch."""
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
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


def rank_micro_batches(run: RunSetup, step: int, accum: int, rank: int) -> List[Batch]:
    """This rank's micro-batches of optimizer step ``step`` (a fixed slice of the global window)."""
    cfg = run.cfg
    keys = global_indices(len(run.train_examples), cfg.train.seed, step, cfg.train.global_batch_size)
    m = cfg.train.micro_batch_size
    mine = keys[rank * accum * m : (rank + 1) * accum * m]
    out = []
    for j in range(accum):
        chunk = mine[j * m : (j + 1) * m]
        out.append(collate([run.train_examples[i] for _, i in chunk], chunk, cfg.data.num_anchors, cfg.train.seed, run.pad_id))
    return out


def local_weight_sum(batches: List[Batch], block_size: int, decay_gamma: float) -> torch.Tensor:
    total = torch.zeros(())
    w = slot_weights(block_size, decay_gamma)
    for b in batches:
        t = block_targets(b.input_ids, b.loss_mask, b.anchors, b.anchor_valid, block_size)
        total += (t.valid * w).sum()
    return total


def micro_step(run: RunSetup, model, batch: Batch, denominator: torch.Tensor):
    dc = run.drafter_config
    feats = run.features(batch)  # online: target forward; data.source=cache: read from disk
    targets = block_targets(batch.input_ids, batch.loss_mask, batch.anchors, batch.anchor_valid, dc.block_size)
    out = model(feats.aux, batch.input_ids, batch.anchors, targets.prev_tokens)
    tgt = target_logits(feats.final, targets.target_pos, run.lm_head)
    return dspark_loss(out.logits, out.confidence_logits, tgt, targets, run.cfg.loss, denominator)


def summarise(sums: Dict[str, torch.Tensor], cfg) -> Dict[str, float]:
    w = max(float(sums["weight"]), 1e-9)
    m = {
        "loss": (cfg.loss.ce_weight * float(sums["ce"]) + cfg.loss.l1_weight * float(sums["l1"])
                 + cfg.loss.confidence_weight * float(sums["bce"])) / w,
        "ce": float(sums["ce"]) / w,
        "l1": float(sums["l1"]) / w,
        "bce": float(sums["bce"]) / w,
        "tau_est": float(sums["tau"]) / max(float(sums["full_blocks"]), 1.0),
    }
    acc = (sums["accept_k"] / sums["valid_k"].clamp(min=1)).tolist()
    for k, a in enumerate(acc, start=1):
        m[f"accept@{k}"] = a
    if "conf_abs_err" in sums:
        m["conf_abs_err"] = float(sums["conf_abs_err"]) / max(float(sums["valid_k"].sum()), 1.0)
    return m


def train(cfg) -> Path:
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    run = build_run(cfg, acc)
    out_dir = run.out_dir
    accum = plan_batches(cfg, acc.num_processes)
    steps = total_steps(cfg, len(run.train_examples))

    model = run.drafter
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    model, optimizer = acc.prepare(model, optimizer)

    log_path = out_dir / "metrics.jsonl"
    bar = tqdm(total=steps, desc="train", disable=not (acc.is_main_process and cfg.train.progress_bar))
    t0 = time.time()
    tokens_seen = 0
    last: Dict[str, float] = {}
    for step in range(steps):
        model.train()
        batches = [b.to(acc.device) for b in rank_micro_batches(run, step, accum, acc.process_index)]
        # The loss is normalised by the weight sum of the *global* batch, known before any backward.
        denom = acc.reduce(local_weight_sum(batches, run.drafter_config.block_size, cfg.loss.decay_gamma).to(acc.device), "sum")
        denom = denom.clamp(min=1e-6) / acc.num_processes  # DDP averages gradients over ranks
        sums: Dict[str, torch.Tensor] = {}
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            with acc.autocast(), (acc.no_sync(model) if not sync else _nullcontext()):
                out = micro_step(run, model, batch, denom)
                acc.backward(out.loss)
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0) + v
            tokens_seen += int(batch.attention_mask.sum())
        loss_check = float(sums["ce"])
        if not math.isfinite(loss_check):
            raise FloatingPointError(f"non-finite loss at step {step} (ce sum={loss_check})")
        grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip) if cfg.train.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if (step + 1) % cfg.train.log_every == 0 or step == steps - 1:
            sums = {k: acc.reduce(v.to(acc.device), "sum") for k, v in sums.items()}
            last = summarise(sums, cfg)
            last.update(step=step + 1, lr=scheduler.get_last_lr()[0],
                        grad_norm=float(grad_norm) if grad_norm is not None else None,
                        tokens_per_s=tokens_seen * acc.num_processes / max(time.time() - t0, 1e-9))
            if acc.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", tau=f"{last['tau_est']:.2f}")
        bar.update(1)
    bar.close()

    acc.wait_for_everyone()
    drafter = acc.unwrap_model(model)
    result: Dict[str, object] = {"train_steps": steps, "train_time_s": time.time() - t0, "final_metrics": last}
    if acc.is_main_process:
        save_native(drafter, out_dir / "drafter")
        if cfg.eval.enabled:
            from deepspec.training.setup import run_eval

            result["eval"] = run_eval(run, drafter.eval(), out_dir)
        atomic_write_text(out_dir / "train_summary.json", json.dumps(result, indent=2))
    acc.wait_for_everyone()
    return out_dir


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
