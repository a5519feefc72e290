"""The one way tests start Python in fresh processes: one process, ``torchrun`` or ``accelerate launch``
(2 processes on this machine), or two ``accelerate launch`` launchers acting as two nodes.

Every launch gets the same environment: this checkout first on ``PYTHONPATH`` (so a worktree tests
itself, not an installed copy), one OpenMP thread per process (the CI machine has 2 cores), no
tokenizer threads, and no fault injection unless the test asks for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = str(REPO / "deepspec" / "train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    full = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    if "DEEPSPEC_FAULTS" not in (env or {}):
        full.pop("DEEPSPEC_FAULTS", None)
    return full


def launcher_cmd(launcher: Optional[str], nproc: int = 2, port: Optional[int] = None) -> List[str]:
    """The command line before the script: ``None`` (plain python), ``"torchrun"``, or the name of a
    config in configs/accelerate/ (``accelerate launch --config_file configs/accelerate/<name>.yaml``)."""
    if launcher is None:
        return [sys.executable]
    port = str(port or free_port())
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
        ]
    config = REPO / "configs" / "accelerate" / f"{launcher}.yaml"
    if not config.is_file():
        raise ValueError(f"launcher {launcher!r}: expected None, 'torchrun' or a config in {config.parent}")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        port,
    ]


def run_script(
    script: str | Path,
    args: Sequence[str] = (),
    launcher: Optional[str] = None,
    nproc: int = 2,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """``script args`` under ``launcher`` (see :func:`launcher_cmd`); output captured as text."""
    cmd = launcher_cmd(launcher, nproc) + [str(script), *map(str, args)]
    return subprocess.run(
        cmd, cwd=str(cwd or REPO), env=launch_env(env), capture_output=True, text=True, timeout=timeout
    )


def run_worker(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """``tests/<name>.py args`` under torchrun with 2 processes; fails the test with the output's tail."""
    r = run_script(REPO / "tests" / f"{name}.py", args, "torchrun", timeout=timeout)
    assert r.returncode == 0, tail(r)
    return r


def run_two_nodes(
    script: str | Path,
    args: Sequence[str],
    launcher: str = "ddp",
    env: Optional[Dict[str, str]] = None,
    timeout: int = 600,
) -> List[str]:
    """Two ``accelerate launch`` launchers on this machine acting as two nodes (one CPU process each,
    gloo), meeting on 127.0.0.1 as real nodes do on the main node's address. Returns each node's output."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = launcher_cmd(launcher, nproc=2, port=port)
        cmd += ["--num_machines", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1"]
        procs.append(
            subprocess.Popen(
                cmd + [str(script), *args],
                cwd=str(REPO),
                env=launch_env({"ACCELERATE_USE_CPU": "1", **(env or {})}),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node}:\n{out[-4000:]}"
    return outs


def tail(r: subprocess.CompletedProcess, n: int = 4000) -> str:
    return ((r.stdout or "") + (r.stderr or ""))[-n:]
