"""Shared fixtures: the micro tiny targets (built once per session into a temporary cache)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helper modules

MICRO_TARGET = {
    "max_files": 150,
    "train_steps": 40,
    "hidden_size": 64,
    "head_dim": 16,
    "intermediate_size": 128,
    "num_layers": 4,
    "vocab_size": 1024,
    "batch_size": 8,
    "seq_len": 128,
}


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny tensors, which gain nothing from threads; on a busy 2-core machine OpenMP
    spin-waits make them crawl. Session scope, so module fixtures that build models get it too;
    subprocess tests set OMP_NUM_THREADS themselves."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def reset_torch_threads():
    """A test that changes the thread count does not leak it into the next one."""
    yield
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def micro_target(tmp_path_factory):
    """(folder, TinyTargetConfig, Hydra overrides) of a tiny target small enough to build in ~20 s."""
    import torch

    from deepspec.config import TinyTargetConfig
    from deepspec.target.tiny import build_tiny_target

    cache = tmp_path_factory.mktemp("tiny-cache")
    cfg = TinyTargetConfig(**MICRO_TARGET, cache_dir=str(cache), num_threads=1)
    n = torch.get_num_threads()
    try:
        path = build_tiny_target(cfg, log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    overrides = [f"target.tiny.{k}={v}" for k, v in MICRO_TARGET.items()] + [f"target.tiny.cache_dir={cache}"]
    return path, cfg, overrides


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Folder holding the built micro target of the training tests (``train_fixtures.MICRO_TARGET``);
    DEEPSPEC_TEST_TINY_CACHE reuses one across sessions."""
    import torch
    from train_fixtures import MICRO_TARGET as TRAIN_MICRO_TARGET

    from deepspec.config import TinyTargetConfig
    from deepspec.target.tiny import build_tiny_target

    d = Path(os.environ.get("DEEPSPEC_TEST_TINY_CACHE") or tmp_path_factory.getbasetemp() / "tiny-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_tiny_target(TinyTargetConfig(**TRAIN_MICRO_TARGET, cache_dir=str(d)))
    finally:
        torch.set_num_threads(threads)
    return d


@pytest.fixture(scope="session")
def qwen3_target():
    """The default tiny random Qwen3 target of tests/tiny_models.py (4 layers, vocab 128), in eval mode.
    Shared by the whole session: do not modify it."""
    from tiny_models import tiny_target

    return tiny_target("qwen3")


@pytest.fixture
def qwen3_drafter(qwen3_target):
    """A fresh default DSpark drafter (2 layers, γ = 4, vanilla Markov head of rank 16) for qwen3_target."""
    from tiny_models import tiny_drafter

    return tiny_drafter(qwen3_target)


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM environment's python, made once (scripts/make_vllm_env.sh) for every engine test."""
    import time

    from deepspec.engine.vllm_env import find_vllm_python

    t = time.monotonic()
    python = find_vllm_python(setup=True)
    print(f"vLLM environment: {python} ({time.monotonic() - t:.0f} s)")
    return python
