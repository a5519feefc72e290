"""Checkpoints: atomic, engine-independent, pruned to the last K plus the best held-out τ.

Layout of ``train.checkpoint.dir`` (default ``<output_dir>/checkpoints``)::

    step-00000200/
      model.safetensors      trainable drafter weights, full fp32 (the master copy), by parameter name
      optimizer.safetensors  AdamW moments exp_avg.<name> / exp_avg_sq.<name>, full fp32
      scheduler.json         LR scheduler state
      rng/rank-00000.safetensors   torch / CUDA / python / numpy RNG state of each rank
      drafter_config.json    the resolved drafter config (resume refuses a different one)
      config.yaml            the resolved run config
      trainer_state.json     step, data position, AdamW step, world size, engine, held-out τ, metrics,
                             size + sha256 of every other file, and a sha256 of itself
    index.json               latest / best / kept checkpoints (informational)

A checkpoint is written into a ``.step-XXXXXXXX.staging-*`` folder and renamed into place only when
complete (``deepspec.atomic.staged_dir``), so a directory named ``step-*`` is always whole; pruning
renames a checkpoint aside before deleting it. The frozen embedding and lm_head are not stored: they
are copies of the target's and are restored from it.
Everything is read back with safetensors or json; nothing is unpickled. Resuming verifies every
file's sha256 first (deepspec/training/resume_checks.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from safetensors import safe_open

from deepspec import atomic, secrets
from deepspec.models.config import upgrade_spec_dict
from deepspec.training import distributed as dist_utils
from deepspec.training import engine_state
from deepspec.training.faults import maybe_kill
from deepspec.training.resume_checks import apply_hparams, file_digests, pick_verified, seal, set_aside
from deepspec.training.rng import capture_rng, restore_rng, rng_tensors

log = logging.getLogger("deepspec")

FORMAT = "deepspec-train-checkpoint"
VERSION = 1
STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
# Drafter config fields that may differ between a checkpoint and the run resuming it.
_DRAFTER_FREE = {"num_anchors", "sts_temperatures", "target_config"}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int:
    m = STEP_RE.match(path.name)
    return int(m.group(1)) if m else int(json.loads((path / STATE_FILE).read_text())["step"])


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    state: dict

    @property
    def heldout_tau(self) -> Optional[float]:
        return (self.state.get("heldout") or {}).get("tau_est")


def list_checkpoints(ckpt_dir: Path) -> List[CheckpointInfo]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    out = []
    if not ckpt_dir.is_dir():
        return out
    for d in ckpt_dir.iterdir():
        m = STEP_RE.match(d.name)
        if not (m and d.is_dir() and (d / STATE_FILE).is_file()):
            continue
        try:
            state = json.loads((d / STATE_FILE).read_text())
        except (OSError, ValueError):
            continue
        out.append(CheckpointInfo(d, int(m.group(1)), state))
    return sorted(out, key=lambda c: c.step)


def find_checkpoint(resume: str, ckpt_dir: Path) -> Optional[Path]:
    """``train.resume``: none -> None; auto -> newest in ckpt_dir (or None); else a checkpoint folder,
    a checkpoints folder, or a run folder holding ``checkpoints/``."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1].path if found else None
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        found = list_checkpoints(candidate)
        if found:
            return found[-1].path
    raise FileNotFoundError(
        f"train.resume={resume!r}: no checkpoint there (expected a folder with {STATE_FILE}, "
        "a checkpoints folder, or a run folder with checkpoints/)"
    )


class LazyTensors:
    """A safetensors file as a read-only mapping that loads one tensor at a time (every rank reads the
    checkpoint; none of them should hold all of it at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> LazyTensors:
        self._ctx = safe_open(str(self.path), "pt")
        self._f = self._ctx.__enter__()
        self._keys = list(self._f.keys())
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def __iter__(self):
        return iter(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)


def drafter_fingerprint(drafter_config) -> dict:
    return {k: v for k, v in drafter_config.to_dict().items() if k not in _DRAFTER_FREE}


def prune_checkpoints(ckpt_dir: Path, keep_last: int, keep_best: bool) -> dict:
    """Delete all but the newest ``keep_last`` checkpoints and (if ``keep_best``) the one with the best
    held-out τ estimate (ties: the newer). Writes and returns the index."""
    found = list_checkpoints(ckpt_dir)
    keep = {c.path for c in found[-keep_last:]} if keep_last > 0 else set()
    scored = [c for c in found if c.heldout_tau is not None]
    best = max(scored, key=lambda c: (c.heldout_tau, c.step)) if scored else None
    if keep_best and best is not None:
        keep.add(best.path)
    for c in found:
        if c.path not in keep:
            atomic.remove_dir(c.path)
    kept = [c for c in found if c.path in keep]
    index = {
        "latest": kept[-1].path.name if kept else None,
        "best": best.path.name if best is not None and best.path in keep else None,
        "best_metric": "heldout tau_est (from c*, higher is better)",
        "checkpoints": [{"name": c.path.name, "step": c.step, "heldout_tau": c.heldout_tau} for c in kept],
    }
    atomic.write_json(ckpt_dir / "index.json", index, sort_keys=True)
    return index


# ----------------------------------------------------------------------------- the checkpointer
class Checkpointer:
    """Saves and restores the whole training state. Every rank calls ``save`` and ``resume``."""

    def __init__(self, cfg, acc, run, total_steps: int, scorer: Optional[Callable] = None) -> None:
        self.cfg, self.acc, self.run, self.total_steps = cfg, acc, run, total_steps
        self.c = cfg.train.checkpoint
        if self.c.keep_last < 1:
            raise ValueError(f"train.checkpoint.keep_last={self.c.keep_last}: keep at least 1")
        if self.c.every < 0:
            raise ValueError(f"train.checkpoint.every={self.c.every}: expected >= 0 (0 = only at the end)")
        self.dir = Path(self.c.dir)
        self.scorer = scorer
        self.last_good: Optional[Path] = None
        self.last_heldout: Optional[dict] = None
        self.continued_with: Optional[str] = None  # the resumed run's settings, for the log
        self.resumed_metrics: dict = {}
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in atomic.remove_stale(self.dir):
                if ".staging-" in stale.name:
                    log.warning("removed an incomplete checkpoint left by an interrupted write: %s", stale)
        acc.wait_for_everyone()
        found = list_checkpoints(self.dir)
        self.last_good = found[-1].path if found else None

    def due(self, step: int) -> bool:
        """Checkpoint after ``step`` optimizer steps?"""
        if step == self.total_steps and self.c.save_final:
            return True
        return self.c.every > 0 and step % self.c.every == 0

    # ------------------------------------------------------------------ save
    def save(
        self, step: int, model, optimizer, scheduler, metrics: Optional[dict] = None, skipped_steps: int = 0
    ) -> Path:
        acc, cfg = self.acc, self.cfg
        t0 = time.time()
        heldout = self.last_heldout = self.scorer(model) if self.scorer is not None else None  # collective
        weights = engine_state.full_weights(acc, model)  # collective
        moments, adam_step = engine_state.full_optimizer_state(acc, model, optimizer)  # collective
        rng = dist_utils.gather_objects(acc, capture_rng())
        final = self.dir / step_dir_name(step)
        if acc.is_main_process:
            with atomic.staged_dir(final) as tmp:  # replaces a same-step checkpoint of an earlier attempt
                atomic.write_tensors(tmp / "model.safetensors", weights, {"format": FORMAT})
                maybe_kill("kill_in_checkpoint", step)
                atomic.write_tensors(
                    tmp / "optimizer.safetensors", moments, {"format": FORMAT, "adam_step": str(adam_step)}
                )
                atomic.write_json(tmp / "scheduler.json", scheduler.state_dict(), sort_keys=True)
                for rank, state in enumerate(rng):
                    tensors, meta = rng_tensors(state)
                    atomic.write_tensors(tmp / "rng" / f"rank-{rank:05d}.safetensors", tensors, meta)
                atomic.write_json(
                    tmp / "drafter_config.json",
                    self.run.drafter_config.to_dict() | {"target_config": "<omitted>"},
                    sort_keys=True,
                )
                atomic.write_text(tmp / "config.yaml", secrets.config_yaml(cfg))
                g = cfg.train.global_batch_size
                n = len(self.run.train_examples)
                state = {
                    "format": FORMAT,
                    "version": VERSION,
                    "step": step,
                    "total_steps": self.total_steps,
                    "adam_step": adam_step,
                    "skipped_steps": skipped_steps,
                    "data": {
                        "global_step": step,
                        "samples_consumed": step * g,
                        "epoch": (step * g) // max(n, 1),
                        "global_batch_size": g,
                        "num_train_sequences": n,
                        "seed": cfg.train.seed,
                    },
                    "world_size": acc.num_processes,
                    "engine": dist_utils.engine_kind(acc),
                    "zero_stage": dist_utils.zero_stage(acc),
                    "mixed_precision": cfg.train.mixed_precision,
                    "drafter": drafter_fingerprint(self.run.drafter_config),
                    "target": self.run.target_path,
                    "heldout": heldout,
                    "metrics": metrics or {},
                    "files": file_digests(tmp),
                    "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
                atomic.write_json(tmp / STATE_FILE, seal(state), sort_keys=True)  # written last
            prune_checkpoints(self.dir, self.c.keep_last, self.c.keep_best)
            log.info(
                "checkpoint %s written in %.1fs%s",
                final,
                time.time() - t0,
                f" (held-out τ estimate {heldout['tau_est']:.3f})" if heldout else "",
            )
        acc.wait_for_everyone()
        self.last_good = final
        if acc.is_main_process:
            maybe_kill("kill_after_checkpoint", step)
        return final

    # ------------------------------------------------------------------ resume
    def resume(self, model, optimizer, scheduler) -> int:
        """Restore the newest (or the given) checkpoint; return the step to continue from (0 = fresh)."""
        acc, cfg = self.acc, self.cfg
        path = find_checkpoint(cfg.train.resume, self.dir)
        corrupted = []
        if path is not None:
            explicit = cfg.train.resume != "auto"
            candidates = [path] if explicit else [c.path for c in list_checkpoints(self.dir)]
            path, corrupted = pick_verified(candidates, explicit)
        existing = list_checkpoints(self.dir)
        newer = [c for c in existing if path is None or (c.path != path and c.step >= _step_of(path))]
        if newer and cfg.train.resume != "auto":
            # Retention orders checkpoints by step: mixing in another run's would resume the wrong one later.
            raise ValueError(
                f"train.resume={cfg.train.resume} but {self.dir} already holds checkpoints up to "
                f"{newer[-1].path.name} from an earlier run; use another train.output_dir / "
                "train.checkpoint.dir, delete them, or train.resume=auto to continue that run"
            )
        if path is None:
            if cfg.train.resume not in ("auto", "none"):
                raise FileNotFoundError(f"train.resume={cfg.train.resume!r}: nothing to resume from")
            return 0
        state = json.loads((path / STATE_FILE).read_text())
        self._check_compatible(path, state)
        acc.wait_for_everyone()  # every rank verified the files before one of them moves any
        if acc.is_main_process:
            set_aside(corrupted, path)
        with LazyTensors(path / "model.safetensors") as weights:
            engine_state.load_full_weights(acc, model, weights)
        with LazyTensors(path / "optimizer.safetensors") as moments:
            engine_state.load_full_optimizer_state(acc, model, optimizer, moments, int(state["adam_step"]))
        scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        continued = apply_hparams(cfg, path, state, scheduler, self.total_steps)
        same_world = state["world_size"] == acc.num_processes
        rng_file = path / "rng" / f"rank-{acc.process_index:05d}.safetensors"
        if same_world and rng_file.is_file():
            restore_rng(rng_file)
        else:
            torch.manual_seed(cfg.train.seed * 1_000_003 + state["step"] * 101 + acc.process_index)
        step = int(state["step"])
        if acc.is_main_process:
            log.info(
                "resuming from %s: step %d/%d, %d samples consumed (epoch %d); written by %d process(es) with %s%s",
                path,
                step,
                self.total_steps,
                state["data"]["samples_consumed"],
                state["data"]["epoch"],
                state["world_size"],
                state["engine"],
                ""
                if same_world
                else f"; now {acc.num_processes} process(es): data order, weights, AdamW state and "
                "lr are restored exactly, gradient sums are reduced in a different order (float rounding differs) "
                "and per-rank RNG streams are re-seeded",
            )
            log.info("%s", continued)
        self.continued_with = continued
        self.resumed_metrics = state.get("metrics") or {}
        self.last_good = path
        return step

    def _check_compatible(self, path: Path, state: dict) -> None:
        cfg = self.cfg
        if state.get("format") != FORMAT or int(state.get("version", 0)) > VERSION:
            raise ValueError(f"{path}: not a deepspec training checkpoint of version <= {VERSION}")
        saved = upgrade_spec_dict(json.loads((path / "drafter_config.json").read_text()))
        now = drafter_fingerprint(self.run.drafter_config)
        diff = {
            k: (saved.get(k), now.get(k))
            for k in sorted(set(saved) | set(now))
            if k not in _DRAFTER_FREE and saved.get(k) != now.get(k)
        }
        if diff:
            shown = "; ".join(
                f"{k}: checkpoint {a!r} vs this run {b!r}" for k, a, b in ((k, *v) for k, v in diff.items())
            )
            raise ValueError(
                f"cannot resume from {path}: it was trained with a different drafter config ({shown}). "
                "Use the same model.* settings and target, or train.resume=none to start over"
            )
        data = state["data"]
        if data["global_batch_size"] != cfg.train.global_batch_size or data["seed"] != cfg.train.seed:
            raise ValueError(
                f"cannot resume from {path}: its data order was made with train.global_batch_size="
                f"{data['global_batch_size']}, train.seed={data['seed']}; this run has {cfg.train.global_batch_size}, "
                f"{cfg.train.seed}. Keep them (the micro batch and the world size may change)"
            )
        n = len(self.run.train_examples)
        if data["num_train_sequences"] != n:
            log.warning(
                "checkpoint %s was trained on %d sequences, this run has %d: the data order after resuming "
                "is not the one the interrupted run would have seen",
                path,
                data["num_train_sequences"],
                n,
            )
