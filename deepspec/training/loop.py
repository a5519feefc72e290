"""Online distillation: the frozen target computes features per batch, the drafter learns from them.

:func:`train` reads top to bottom:

1. :func:`preflight`: every check that needs no model and writes nothing, returning the plan.
2. launch (:func:`launch`: accelerator, seeds) and :func:`setup` (run, optimizer, resume).
3. for each optimizer step, :func:`train_step` (micro-batches: target features, drafter forward,
   loss, backward; then clip and step), then the hooks: :class:`MetricsHook` and
   :func:`checkpoint_hook`.
4. :func:`finish_run`: final weights, evaluation, export, summary.

Launch modes live in distributed.py, checkpoints in checkpoint.py, metric sinks in metrics_log.py,
the NaN/inf policy in nonfinite.py (docs/training.md).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from accelerate.utils import set_seed

from deepspec.config import validate
from deepspec.data.anchors import block_targets, slot_weights
from deepspec.data.batching import Batch, collate, global_indices
from deepspec.exporting.formats import check_markov_head
from deepspec.exporting.native import save_native
from deepspec.exporting.pipeline import check_export_settings, check_push_verifier
from deepspec.losses import LossOutput, dspark_loss, summarise, target_logits
from deepspec.target.sharding import check_target_shard
from deepspec.training import distributed as dist_utils
from deepspec.training import engine_state
from deepspec.training.checkpoint import Checkpointer
from deepspec.training.faults import maybe_kill
from deepspec.training.heldout import HeldoutScorer
from deepspec.training.metrics_log import RunLogger, peak_memory_gb
from deepspec.training.nonfinite import NonFiniteGuard
from deepspec.training.optim import build_optimizer, build_scheduler
from deepspec.training.plan import dry_run, plan_batches, total_steps
from deepspec.training.run_dir import RunDir, write_summary
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
    # loss.chunked_head: the parallel drafter hands over its head's factors, not [.., V] logits.
    chunked = run.cfg.loss.chunked_head and run.cfg.loss.impl == "lean" and dc.kind != "eagle3"
    extra = {"chunked_head": True} if chunked else {}
    out = model(feats.aux, batch.input_ids, batch.anchors, targets.prev_tokens, **extra)
    tgt = target_logits(
        feats.final,
        targets.target_pos,
        run.lm_head,
        lazy=run.cfg.loss.lazy_target_logits,
        softcap=dc.final_logit_softcapping,  # the target's own logits (Gemma 4 soft-caps them)
    )
    return dspark_loss(
        out.logits,
        out.confidence_logits,
        tgt,
        targets,
        run.cfg.loss,
        denominator,
        draft_ids=run.draft_ids,
        greedy_confidence_logits=out.greedy_confidence_logits,
    )


# ----------------------------------------------------------------------------- pre-flight and setup
@dataclass
class TrainPlan:
    """What :func:`preflight` decided, before any model is loaded or any file written."""

    strategy: str  # single | ddp | deepspeed | fsdp
    world_size: int
    accum: int  # micro-batches per rank per optimizer step


def preflight(cfg) -> TrainPlan:
    """Every check that needs no model, run before anything is written: a run that fails one leaves
    no trace. New checks of the same kind (the output folder, an earlier run in it) belong here."""
    validate(cfg)  # every number and choice
    if cfg.export.after_training:
        # A bad repo id, a missing Hub token, a Markov head the format cannot carry or a local verifier
        # for a push fails now.
        check_export_settings(cfg.export)
        check_push_verifier(cfg)
        if cfg.model.kind == "dspark" and cfg.model.markov_rank:
            check_markov_head(str(cfg.model.markov_head_type), str(cfg.export.format))
    strategy = dist_utils.resolve_strategy(cfg)
    if cfg.loss.chunked_head and strategy in ("fsdp", "deepspeed"):
        # The chunked head reads the drafter's lm_head and W2 in the loss, after the forward, when
        # FSDP / ZeRO-3 have already released the gathered weights.
        raise ValueError(
            f"loss.chunked_head=true is not supported with train.strategy={strategy} (it shards the "
            "drafter's weights); use train.strategy=ddp|single or loss.chunked_head=false"
        )
    world = dist_utils.launcher_world_size()
    check_target_shard(cfg, world)
    return TrainPlan(strategy=strategy, world_size=world, accum=plan_batches(cfg, world))


def launch(cfg, plan: TrainPlan):
    acc = dist_utils.make_accelerator(cfg, plan.strategy, plan.accum)
    set_seed(cfg.train.seed, device_specific=True)  # python / numpy / torch RNGs, offset by rank
    return acc


@dataclass
class StepParts:
    """What one optimizer step touches. :func:`setup` builds it from a run; a test can build it from
    stand-ins (any ``acc`` with accelerate's reduce / backward / clip_grad_norm_ / no_sync / autocast)."""

    acc: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    guard: NonFiniteGuard
    loss: Callable[[torch.nn.Module, Batch, torch.Tensor], LossOutput]  # (model, micro-batch, denominator)
    weight_sum: Callable[[List[Batch]], torch.Tensor]  # this rank's Σ w_k·valid over the step's micro-batches
    grad_clip: float  # <= 0: no clipping
    mixed_precision: str


@dataclass
class Training:
    """A set-up run: everything the step loop and the hooks use."""

    cfg: Any
    run: RunSetup
    parts: StepParts
    ckpt: Checkpointer
    logger: RunLogger
    steps: int  # total optimizer steps
    start: int  # first step to run (> 0 after a resume)
    accum: int


def setup(cfg, acc, plan: TrainPlan, owned: RunDir) -> Training:
    """Load, build, resume. ``owned`` (the locked run dir) gets its provenance only once the resume
    checks passed: a refused start writes nothing."""
    with dist_utils.frozen_target_outside_deepspeed():
        run = build_run(cfg, acc)
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
    owned.commit(run.info)  # every start-up check passed: only now config.yaml, run_info.json, train.log
    block_size, gamma = run.drafter_config.block_size, cfg.loss.decay_gamma
    parts = StepParts(
        acc=acc,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        guard=NonFiniteGuard(cfg, acc, ckpt),
        loss=functools.partial(micro_step, run),
        weight_sum=lambda batches: local_weight_sum(batches, block_size, gamma),
        grad_clip=cfg.train.grad_clip,
        mixed_precision=cfg.train.mixed_precision,
    )
    logger = RunLogger(cfg, acc, run.out_dir, steps, start)
    return Training(cfg, run, parts, ckpt, logger, steps, start, plan.accum)


# ----------------------------------------------------------------------------- one optimizer step
@dataclass
class StepResult:
    sums: Dict[str, torch.Tensor]  # this rank's loss sums over the step's micro-batches (not reduced)
    tokens: int  # this rank's non-padding tokens
    skipped: bool  # a non-finite loss dropped the update (train.on_nonfinite=skip)
    grad_norm: Optional[torch.Tensor]  # before clipping; None when skipped
    lr: float  # the lr this step used


def train_step(parts: StepParts, step: int, batches: List[Batch]) -> StepResult:
    """Optimizer step ``step`` (0-based) over this rank's micro-batches, already on the device."""
    acc, model, guard = parts.acc, parts.model, parts.guard
    model.train()
    # Each micro-step loss is its local weighted sum over the weight sum of the *global* batch,
    # known before any backward. The engines then average gradients over ranks and divide each
    # micro-step by the accumulation count; the denominator undoes both, so the update is
    # Σ_all / W_global exactly.
    weight = acc.reduce(parts.weight_sum(batches).to(acc.device), "sum")
    denom = weight.clamp(min=1e-6) / (acc.num_processes * len(batches))
    sums: Dict[str, torch.Tensor] = {}
    tokens, bad = 0, False
    for j, batch in enumerate(batches):
        with (
            dist_utils.grad_sync(acc, model, sync=j == len(batches) - 1),
            dist_utils.bf16_autocast(acc, parts.mixed_precision),
        ):
            out = parts.loss(model, batch, denom)
            bad = guard.check(out.loss, step, j) or bad  # the same answer on every rank
            loss = guard.replacement(out.loss, model) if bad else out.loss
            if loss is not None:
                acc.backward(loss)
        for k, v in out.sums.items():
            sums[k] = sums.get(k, 0) + v
        tokens += int(batch.attention_mask.sum())
    grad_norm = None
    if bad:
        guard.skipped_step(step)
    else:
        clip = parts.grad_clip if parts.grad_clip > 0 else float("inf")
        grad_norm = acc.clip_grad_norm_(model.parameters(), clip)
        parts.optimizer.step()
    lr = parts.scheduler.get_last_lr()[0]
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return StepResult(sums=sums, tokens=tokens, skipped=bad, grad_norm=grad_norm, lr=lr)


# ----------------------------------------------------------------------------- hooks after a step
class MetricsHook:
    """Every ``train.log_every`` steps (and at the last): reduce the step's sums over ranks, write the
    metrics (metrics_log.py); after every step: advance the progress bar."""

    def __init__(self, t: Training) -> None:
        self.t = t
        self.last: Dict[str, Any] = {}  # the metrics of the latest logged step
        self.t_log, self.tokens = time.time(), 0

    def __call__(self, done: int, r: StepResult) -> None:
        t, acc = self.t, self.t.parts.acc
        self.tokens += r.tokens
        if done % t.cfg.train.log_every == 0 or done == t.steps:
            reduced = {k: acc.reduce(v.to(acc.device), "sum") for k, v in r.sums.items()}
            n_tok = float(acc.reduce(torch.tensor([float(self.tokens)], device=acc.device), "sum").item())
            mem = float(
                acc.reduce(torch.tensor([peak_memory_gb(acc.device)], device=acc.device), "max").item()
            )
            last = {} if r.skipped else summarise(reduced, t.cfg.loss)
            last.update(
                lr=r.lr,
                grad_norm=float(r.grad_norm) if r.grad_norm is not None else None,
                tokens_per_s=n_tok / max(time.time() - self.t_log, 1e-9),
                peak_mem_gb=mem,
                skipped_steps=t.parts.guard.skipped,
            )
            self.last = last
            t.logger.log(done, last)
            self.t_log, self.tokens = time.time(), 0
        last = self.last
        t.logger.advance(
            {"loss": f"{last['loss']:.3f}", "tau": f"{last['tau_est']:.2f}"} if "loss" in last else None
        )


def checkpoint_hook(t: Training, done: int, metrics: Dict[str, Any]) -> None:
    if not t.ckpt.due(done):
        return
    p = t.parts
    t.ckpt.save(done, p.model, p.optimizer, p.scheduler, metrics=metrics, skipped_steps=p.guard.skipped)
    if t.ckpt.last_heldout:
        t.logger.log(done, {f"heldout_{k}": v for k, v in t.ckpt.last_heldout.items()})


# ----------------------------------------------------------------------------- the run
def finish_run(
    cfg, acc, run: RunSetup, model, summary: Dict[str, Any], checkpoint_metrics: Optional[dict] = None
) -> Path:
    """After the last step, on every rank: gather the final weights; the main process saves them
    (``<out>/drafter``), evaluates, exports and writes ``train_summary.json`` (``summary`` plus the
    evaluation and export results). A re-run that trained no step (re-evaluate / re-export a finished
    run) keeps the earlier record and appends to it; ``checkpoint_metrics`` (the resumed checkpoint's)
    stand in when that record is missing."""
    acc.wait_for_everyone()
    drafter = engine_state.final_drafter(acc, run, model)  # full fp32 weights, gathered from any engine
    out_dir = run.out_dir
    if acc.is_main_process:
        result = dict(summary)
        save_native(drafter, out_dir / "drafter")
        maybe_kill("kill_after_drafter", 0)
        if cfg.eval.enabled:
            from deepspec.training.setup import run_eval

            result["eval"] = run_eval(run, drafter.eval(), out_dir)
        from deepspec.exporting.pipeline import export_after_training

        exported = export_after_training(cfg, drafter, out_dir, result.get("eval"))
        if exported is not None:
            result["export"] = str(exported.output_dir)
        trained = summary.get("resumed_from_step", 0) < summary.get("train_steps", 1)
        write_summary(out_dir, result, trained=trained, checkpoint_metrics=checkpoint_metrics)
    acc.wait_for_everyone()
    return out_dir


def train(cfg) -> Path:
    if cfg.train.dry_run:
        dry_run(cfg)
        return Path(cfg.train.output_dir)
    plan = preflight(cfg)  # fails before anything is loaded or written
    acc = launch(cfg, plan)
    with RunDir(cfg, acc.is_main_process) as owned:  # the lock: refuses a folder another run is using
        t = setup(cfg, acc, plan, owned)
        metrics = MetricsHook(t)
        t0 = time.time()
        for step in range(t.start, t.steps):
            batches = [b.to(acc.device) for b in rank_micro_batches(t.run, step, t.accum, acc.process_index)]
            result = train_step(t.parts, step, batches)
            metrics(step + 1, result)
            checkpoint_hook(t, step + 1, metrics.last)
        t.logger.close()
        summary = {
            "train_steps": t.steps,
            "resumed_from_step": t.start,
            "skipped_steps": t.parts.guard.skipped,
            "train_time_s": time.time() - t0,
            "final_metrics": metrics.last,
        }
        return finish_run(cfg, acc, t.run, t.parts.model, summary, t.ckpt.resumed_metrics)
