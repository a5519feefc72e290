"""What resuming trusts and what it changes: checkpoint content hashes, and hyperparameters that
differ from the checkpoint's.

Every file of a checkpoint carries its size and sha256 in ``trainer_state.json`` (which carries a
hash of itself). Resuming re-hashes them; with ``train.resume=auto`` a checkpoint that fails is
renamed ``corrupt-step-XXXXXXXX`` (kept for inspection, never resumed) and the previous one is used.

Optimizer settings (lr, betas, weight decay, clipping) and the schedule (warm-up, floor, length)
may change on resume: the new values are applied from the resumed step on, and the log says which
values the run continues with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

from deepspec.training.optim import lr_factor

log = logging.getLogger("deepspec")

# train.* keys applied on resume when they differ from the checkpoint's
_APPLIED = ("lr", "weight_decay", "betas", "warmup_ratio", "min_lr_ratio", "grad_clip", "max_steps", "epochs")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path) -> Dict[str, Dict[str, object]]:
    """{relative path: {"size", "sha256"}} of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def state_text(state: dict) -> str:
    return json.dumps(state, indent=2, sort_keys=True)


def seal(state: dict) -> dict:
    """``state`` plus the sha256 of its own canonical text (a flipped digit in the step shows)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return {**body, "state_sha256": hashlib.sha256(state_text(body).encode()).hexdigest()}


def verify_checkpoint(path: Path, state: dict) -> Optional[str]:
    """None if every recorded file is present with its size and sha256, else what is wrong."""
    if "state_sha256" in state and seal(state)["state_sha256"] != state["state_sha256"]:
        return "trainer_state.json does not match its own sha256 (edited or corrupted)"
    for rel, rec in (state.get("files") or {}).items():
        f = path / rel
        size, digest = (rec, None) if isinstance(rec, int) else (rec.get("size"), rec.get("sha256"))
        if not f.is_file() or f.stat().st_size != size:
            return f"{rel} is missing or truncated (expected {size} bytes)"
        if digest is not None and sha256_file(f) != digest:
            return f"{rel} does not match its recorded sha256 (same size: corrupted on disk or in a copy)"
    return None


def quarantine(path: Path) -> Path:
    """Move a corrupted checkpoint out of the ``step-*`` namespace, keeping it for inspection."""
    dest = path.with_name(f"corrupt-{path.name}")
    n = 1
    while dest.exists():
        dest, n = path.with_name(f"corrupt-{path.name}.{n}"), n + 1
    os.replace(path, dest)
    return dest


def pick_verified(candidates: List[Path], explicit: bool) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """(the newest of ``candidates`` (oldest first) whose files verify, [(corrupted newer one, why)]).

    ``explicit`` (a checkpoint named by the user): a failure is an error, nothing is skipped.
    Nothing is moved here: the caller sets the corrupted ones aside once the start is accepted."""
    bad: List[Tuple[Path, str]] = []
    for path in reversed(candidates):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            problem = verify_checkpoint(path, state)
        except (OSError, ValueError) as e:
            problem = f"trainer_state.json is unreadable ({e})"
        if problem is None:
            return path, bad
        if explicit:
            raise ValueError(
                f"cannot resume from checkpoint {path}: {problem}. Resume from an earlier checkpoint "
                "(train.resume=<its folder>) or start over with train.resume=none in a new train.output_dir"
            )
        bad.append((path, problem))
    if bad:
        raise ValueError(
            "no checkpoint verifies: "
            + "; ".join(f"{p}: {why}" for p, why in bad)
            + ". Start over with train.resume=none in a new train.output_dir"
        )
    return None, bad


def set_aside(bad: List[Tuple[Path, str]], resumed: Path) -> None:
    for path, problem in bad:
        moved = quarantine(path)
        log.warning(
            "checkpoint %s is corrupted: %s. Skipped it (kept as %s) and resumed from the previous "
            "good checkpoint %s",
            path,
            problem,
            moved.name,
            resumed,
        )


def saved_train_config(path: Path) -> dict:
    try:
        return (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def apply_hparams(cfg, path: Path, state: dict, scheduler, total_steps: int) -> str:
    """Put this run's lr / schedule into the restored scheduler and optimizer; return what changed
    and the values the run continues with (one line for the log)."""
    t = cfg.train
    step = int(state["step"])
    factor = lr_factor(step, total_steps, t.warmup_ratio, t.min_lr_ratio)
    # The scheduler's state restores the checkpoint's base lrs; the run's train.lr replaces them.
    scheduler.base_lrs = [float(t.lr)] * len(scheduler.optimizer.param_groups)
    for group in scheduler.optimizer.param_groups:
        group["initial_lr"] = float(t.lr)
    # The same expression LambdaLR evaluates, so an unchanged run resumes bit for bit.
    scheduler._last_lr = [base * factor for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler._last_lr):
        group["lr"] = lr

    saved = saved_train_config(path)
    changes = []
    for k in _APPLIED:
        now = t[k]
        now = list(now) if k == "betas" else now
        if k in saved and saved[k] != now:
            changes.append(f"train.{k} {saved[k]} -> {now}")
    if int(state.get("total_steps", total_steps)) != total_steps:
        changes.append(f"optimizer steps {state['total_steps']} -> {total_steps} (lr schedule re-planned)")
    now_line = (
        f"continuing at step {step}/{total_steps} with lr {scheduler._last_lr[0]:.4g} (train.lr={t.lr}, "
        f"warmup_ratio={t.warmup_ratio}, min_lr_ratio={t.min_lr_ratio}, weight_decay={t.weight_decay}, "
        f"betas={list(t.betas)}, grad_clip={t.grad_clip})"
    )
    if changes:
        return f"settings changed since {path.name}, applied from step {step} on: {'; '.join(changes)}. {now_line}"
    return now_line
