"""Shared pieces of the training tests: a micro tiny target built once per session, Hydra composition,
in-process and launched (torchrun / accelerate launch) runs, checkpoint comparison."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

import torch
from launchers import REPO, TRAIN_PY, free_port, run_script, tail  # noqa: F401 (re-exported to the tests)
from safetensors.torch import load_file

# A target small enough to build in ~20 s on one CPU thread (the default tiny target takes minutes).
MICRO_TARGET = dict(
    max_files=60,
    train_steps=40,
    hidden_size=64,
    head_dim=16,
    intermediate_size=128,
    num_layers=4,
    vocab_size=1024,
    batch_size=8,
    seq_len=128,
)


def micro_overrides(cache_dir: Path, out_dir: Path) -> List[str]:
    return [f"target.tiny.{k}={v}" for k, v in MICRO_TARGET.items()] + [
        f"target.tiny.cache_dir={cache_dir}",
        f"train.output_dir={out_dir}",
        "data.max_length=128",
        "data.num_anchors=16",
        "data.max_train_samples=64",
        "model.markov_rank=16",
        "eval.enabled=false",
        "train.progress_bar=false",
        "train.log_every=1",
        "train.checkpoint.heldout_sequences=2",
        "logging.tensorboard=false",
    ]


def compose(overrides: List[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deepspec.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


_CHAT_SPLITS: Dict[str, dict] = {}


def _cached_chat_splits(original):
    """The tiny chat records depend only on the target's corpus settings; cut them once per session
    (each cut parses the corpus again, seconds per in-process run)."""

    def splits(tiny_cfg):
        from omegaconf import OmegaConf

        key = OmegaConf.to_yaml(tiny_cfg) if OmegaConf.is_config(tiny_cfg) else repr(tiny_cfg)
        if key not in _CHAT_SPLITS:
            _CHAT_SPLITS[key] = original(tiny_cfg)
        return _CHAT_SPLITS[key]

    return splits


def train_here(overrides: List[str]) -> Path:
    """One training run in this process (single process, one thread)."""
    import deepspec.data.tiny_chat as tiny_chat
    from deepspec.training.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reset_accelerate()
    original = tiny_chat.tiny_chat_splits
    tiny_chat.tiny_chat_splits = _cached_chat_splits(original)
    try:
        return train(compose(overrides))
    finally:
        tiny_chat.tiny_chat_splits = original
        reset_accelerate()
        torch.set_num_threads(threads)


def launch(
    args: List[str],
    launcher: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """``deepspec/train.py <args>`` in a fresh process: plain python, ``torchrun`` (2 processes) or
    ``accelerate launch --config_file configs/accelerate/<launcher>.yaml`` (2 processes)."""
    return run_script(TRAIN_PY, args, launcher, env=env, cwd=cwd, timeout=timeout)


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


def state(out: Path, step: int) -> dict:
    return json.loads((ckpt(out, step) / "trainer_state.json").read_text())


def assert_same_tensors(a: Path, b: Path, exact: bool = True, rel: float = 1e-5, atol: float = 0.0) -> None:
    """Equal tensors (bit for bit), or within ``atol`` + ``rel`` x each tensor's largest magnitude."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), f"{a} and {b} hold different tensors"
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), f"{k} differs between {a} and {b}"
        else:
            scale = float(tb[k].abs().max()) + 1e-12
            diff = float((ta[k] - tb[k]).abs().max())
            assert diff <= atol + rel * scale, (
                f"{k}: max |diff| {diff:.3g} > {atol} + {rel} x {scale:.3g} ({a} vs {b})"
            )
