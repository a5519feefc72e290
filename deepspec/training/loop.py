"""Online distillation: the frozen target computes features per batch, the drafter learns from them.

Read top to bottom: set up (launch mode, run, optimizer, resume) -> for each optimizer step:
micro-batches (target forward, drafter forward, loss, backward) -> clip, step, log, checkpoint ->
export -> evaluate. Launch modes live in distributed.py, checkpoints in checkpoint.py, metric sinks
in logging.py, the NaN/inf policy in nonfinite.py (docs/training.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, List

import torch
from accelerate.utils import set_seed

from deepspec.data.anchors import block_targets, slot_weights
from deepspec.data.batching import Batch, collate, global_indices
from deepspec.exporting.native import atomic_write_text, save_native
from deepspec.losses import dspark_loss, target_logits
from deepspec.training import distributed as dist_utils
from deepspec.training import engine_state
from deepspec.training.checkpoint import Checkpointer
from deepspec.training.heldout import HeldoutScorer
from deepspec.training.logging import RunLogger, peak_memory_gb
from deepspec.training.nonfinite import NonFiniteGuard
from deepspec.training.optim import build_optimizer, build_scheduler
from deepspec.training.plan import dry_run, plan_batches, total_steps, validate
from deepspec.training.setup import RunSetup, build_run


def rank_micro_batches(run: RunSetup, step: int, accum: int, rank: int) -> List[Batch]:
    """This rank's micro-batches of optimizer step ``step`` (a fixed slice of the global window)."""
    cfg = run.cfg
    keys = global_indices(len(run.train_examples), cfg.train.seed, step, cfg.train.global_batch_size)
    m = cfg.train.micro_batch_size
    mine = keys[rank * accum * m : (rank + 1) * accum * m]
    out = []
    for j in range(accum):
        chunk = mine[j * m : (j + 1) * m]
        out.append(
            collate(
                [run.train_examples[i] for _, i in chunk],
                chunk,
                cfg.data.num_anchors,
                cfg.train.seed,
                run.pad_id,
            )
        )
    return out


def local_weight_sum(batches: List[Batch], block_size: int, decay_gamma: float) -> torch.Tensor:
    total = torch.zeros(())
    w = slot_weights(block_size, decay_gamma)
    for b in batches:
        t = block_targets(b.input_ids, b.loss_mask, b.anchors, b.anchor_valid, block_size)
        total += (t.valid * w).sum()
    return total


def micro_step(run: RunSetup, model, batch: Batch, denominator: torch.Tensor, features=None):
    dc = run.drafter_config
    # online: target forward; data.source=cache: read from disk; or given (held-out scoring)
    feats = features if features is not None else run.features(batch)
    targets = block_targets(
        batch.input_ids, batch.loss_mask, batch.anchors, batch.anchor_valid, dc.block_size
    )
    out = model(feats.aux, batch.input_ids, batch.anchors, targets.prev_tokens)
    tgt = target_logits(feats.final, targets.target_pos, run.lm_head, lazy=run.cfg.loss.lazy_target_logits)
    return dspark_loss(out.logits, out.confidence_logits, tgt, targets, run.cfg.loss, denominator)


def summarise(sums: Dict[str, torch.Tensor], cfg) -> Dict[str, float]:
    w = max(float(sums["weight"]), 1e-9)
    m = {
        "loss": (
            cfg.loss.ce_weight * float(sums["ce"])
            + cfg.loss.l1_weight * float(sums["l1"])
            + cfg.loss.confidence_weight * float(sums["bce"])
            + cfg.loss.soft_ce_weight * float(sums.get("soft_ce", 0.0))
        )
        / w,
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
    if cfg.export.after_training and not cfg.train.dry_run:
        from deepspec.exporting.pipeline import _preflight

        _preflight(cfg.export)  # a bad repo id or a missing Hub token fails now, not after training
    if cfg.train.dry_run:
        dry_run(cfg)
        return Path(cfg.train.output_dir)
    validate(cfg)
    strategy = dist_utils.resolve_strategy(cfg)
    accum = plan_batches(cfg, dist_utils.launcher_world_size())  # fails before anything is loaded
    acc = dist_utils.make_accelerator(cfg, strategy, accum)
    set_seed(cfg.train.seed, device_specific=True)  # python / numpy / torch RNGs, offset by rank
    with dist_utils.frozen_target_outside_deepspeed():
        run = build_run(cfg, acc)
    out_dir = run.out_dir
    steps = total_steps(cfg, len(run.train_examples))

    # Only the drafter is prepared (wrapped / sharded); the frozen target stays a plain module.
    model = run.drafter
    optimizer = build_optimizer(model.trainable_parameters(), cfg.train)
    scheduler = build_scheduler(optimizer, steps, cfg.train)
    model, optimizer = acc.prepare(model, optimizer)
    ckpt = Checkpointer(
        cfg, acc, run, steps, scorer=HeldoutScorer(run, acc, cfg.train.checkpoint.heldout_sequences)
    )
    start = ckpt.resume(model, optimizer, scheduler)  # 0 unless a checkpoint is restored
    guard = NonFiniteGuard(cfg, acc, ckpt)
    logger = RunLogger(cfg, acc, out_dir, steps, start)

    t0 = time.time()
    t_log, tokens = time.time(), 0
    last: Dict[str, float] = {}
    for step in range(start, steps):
        model.train()
        batches = [b.to(acc.device) for b in rank_micro_batches(run, step, accum, acc.process_index)]
        # Each micro-step loss is its local weighted sum over the weight sum of the *global* batch,
        # known before any backward. The engines then average gradients over ranks and divide each
        # micro-step by `accum`; the denominator undoes both, so the update is Σ_all / W_global exactly.
        weight = acc.reduce(
            local_weight_sum(batches, run.drafter_config.block_size, cfg.loss.decay_gamma).to(acc.device),
            "sum",
        )
        denom = weight.clamp(min=1e-6) / (acc.num_processes * accum)
        sums: Dict[str, torch.Tensor] = {}
        bad = False
        for j, batch in enumerate(batches):
            with (
                dist_utils.grad_sync(acc, model, sync=j == len(batches) - 1),
                dist_utils.bf16_autocast(acc, cfg.train.mixed_precision),
            ):
                out = micro_step(run, model, batch, denom)
                bad = guard.check(out.loss, step, j) or bad  # the same answer on every rank
                loss = guard.replacement(out.loss, model) if bad else out.loss
                if loss is not None:
                    acc.backward(loss)
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0) + v
            tokens += int(batch.attention_mask.sum())
        if bad:
            guard.skipped_step(step)
            grad_norm = None
        else:
            grad_norm = acc.clip_grad_norm_(
                model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            )
            optimizer.step()
        lr = scheduler.get_last_lr()[0]  # the lr this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % cfg.train.log_every == 0 or done == steps:
            reduced = {k: acc.reduce(v.to(acc.device), "sum") for k, v in sums.items()}
            n_tok = float(acc.reduce(torch.tensor([float(tokens)], device=acc.device), "sum").item())
            mem = float(
                acc.reduce(torch.tensor([peak_memory_gb(acc.device)], device=acc.device), "max").item()
            )
            last = {} if bad else summarise(reduced, cfg)
            last.update(
                lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                tokens_per_s=n_tok / max(time.time() - t_log, 1e-9),
                peak_mem_gb=mem,
                skipped_steps=guard.skipped,
            )
            logger.log(done, last)
            t_log, tokens = time.time(), 0
        logger.advance(
            {"loss": f"{last['loss']:.3f}", "tau": f"{last['tau_est']:.2f}"} if "loss" in last else None
        )
        if ckpt.due(done):
            ckpt.save(done, model, optimizer, scheduler, metrics=last, skipped_steps=guard.skipped)
            if ckpt.last_heldout:
                logger.log(done, {f"heldout_{k}": v for k, v in ckpt.last_heldout.items()})
    logger.close()

    acc.wait_for_everyone()
    drafter = engine_state.final_drafter(acc, run, model)  # full fp32 weights, gathered from any engine
    result: Dict[str, object] = {
        "train_steps": steps,
        "resumed_from_step": start,
        "skipped_steps": guard.skipped,
        "train_time_s": time.time() - t0,
        "final_metrics": last,
    }
    if acc.is_main_process:
        save_native(drafter, out_dir / "drafter")
        if cfg.eval.enabled:
            from deepspec.training.setup import run_eval

            result["eval"] = run_eval(run, drafter.eval(), out_dir)
        from deepspec.exporting.pipeline import export_after_training

        exported = export_after_training(cfg, drafter, out_dir, result.get("eval"))
        if exported is not None:
            result["export"] = str(exported.output_dir)
        atomic_write_text(out_dir / "train_summary.json", json.dumps(result, indent=2))
    acc.wait_for_everyone()
    return out_dir
