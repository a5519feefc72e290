"""Where training metrics go: progress bar with ETA, a console line, metrics.jsonl, TensorBoard, W&B.

Only the main process writes. W&B is opt-in (``logging.wandb=true``); its mode follows WANDB_MODE
(``offline`` keeps everything under ``logging.wandb_dir``). The run config sent to W&B has every value
whose key looks like a credential removed, and no token ids or texts are ever logged.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from deepspec import atomic
from deepspec.secrets import redact
from deepspec.training.faults import maybe_kill

log = logging.getLogger("deepspec")

# Flat metric name -> TensorBoard / W&B tag.
_GROUPS = {"tokens_per_s": "perf", "peak_mem_gb": "perf", "step_time_s": "perf", "skipped_steps": "train"}


def scrub_secrets(obj):
    """A copy of a nested dict/list with credential-like keys (hub/API tokens, passwords) redacted."""
    return redact(obj)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory on CUDA; peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _tag(name: str) -> str:
    if name.startswith("heldout_"):
        return "heldout/" + name[len("heldout_") :]
    return f"{_GROUPS.get(name, 'train')}/{name}"


class RunLogger:
    def __init__(self, cfg, acc, out_dir: Path, total_steps: int, start_step: int) -> None:
        self.cfg, self.acc, self.total, self.start = cfg, acc, total_steps, start_step
        self.main = acc.is_main_process
        self.jsonl = Path(out_dir) / "metrics.jsonl"
        self.console_every = cfg.logging.console_every or cfg.train.log_every
        self.t0 = time.time()
        self.tb = None
        self.wandb = None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            dynamic_ncols=True,
            disable=not (self.main and cfg.train.progress_bar),
        )
        if not self.main:
            return
        _trim_jsonl(self.jsonl, start_step)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(cfg.logging.tensorboard_dir), purge_step=start_step + 1)
        if cfg.logging.wandb:
            self.wandb = _start_wandb(cfg, Path(out_dir))

    def eta(self, step: int) -> float:
        done = step - self.start
        return (time.time() - self.t0) / done * (self.total - step) if done > 0 else float("nan")

    def advance(self, postfix: Optional[Dict[str, str]] = None) -> None:
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def log(self, step: int, metrics: Dict[str, object]) -> None:
        """``metrics``: flat name -> number (see docs/training.md for the list)."""
        if not self.main:
            return
        rec = {"step": step, **metrics}
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        maybe_kill("kill_after_metrics", step)
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(_tag(k), v, step)
        if self.wandb is not None:
            self.wandb.log({_tag(k): v for k, v in numeric.items()}, step=step)
        if step % self.console_every == 0 or step == self.total:
            parts = [f"step {step}/{self.total}"]
            for k, fmt in (
                ("loss", ".4f"),
                ("ce", ".3f"),
                ("tau_est", ".3f"),
                ("accept@1", ".3f"),
                ("lr", ".2e"),
                ("grad_norm", ".3f"),
                ("tokens_per_s", ",.0f"),
                ("peak_mem_gb", ".2f"),
                ("heldout_tau_est", ".3f"),
            ):
                if isinstance(metrics.get(k), (int, float)):
                    parts.append(f"{k} {metrics[k]:{fmt}}")
            parts.append(f"eta {_fmt_time(self.eta(step))}" if step < self.total else "done")
            self.bar.write(" | ".join(parts)) if not self.bar.disable else log.info(" | ".join(parts))

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _trim_jsonl(path: Path, keep_through: int) -> None:
    """A fresh run starts a new metrics.jsonl; a resumed one drops the lines logged after its checkpoint
    (the interrupted run got further than the checkpoint it is resumed from)."""
    if not path.exists():
        return
    if keep_through == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= keep_through:
                kept.append(line)
        except ValueError:
            continue
    atomic.write_text(path, "".join(k + "\n" for k in kept))


def _start_wandb(cfg, out_dir: Path):
    import wandb

    wdir = Path(cfg.logging.wandb_dir)
    wdir.mkdir(parents=True, exist_ok=True)
    # Keep wandb's scratch files with the run (not in the home folder) unless the user chose otherwise.
    for var, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        os.environ.setdefault(var, str(wdir / "wandb" / sub))
    id_file = out_dir / "wandb_run_id.txt"  # a resumed run continues the same W&B run
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(
        project=cfg.logging.wandb_project,
        entity=cfg.logging.wandb_entity,
        name=cfg.logging.wandb_name or cfg.run_name,
        tags=list(cfg.logging.wandb_tags),
        dir=str(wdir),
        id=run_id,
        resume="allow" if run_id else None,
        config=scrub_secrets(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)),
    )
    if run_id is None:
        id_file.write_text(run.id)
    return run
