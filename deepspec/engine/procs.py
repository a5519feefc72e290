"""Processes of the vLLM environment: always stopped by their process id, ports always freed.

vLLM starts helper processes of its own (engine core, workers); each process we start leads a new
session, so stopping it signals the whole process group. Stopping runs in ``finally`` blocks, so it
also happens on an error or Ctrl-C in the caller; SIGTERM to the caller is turned into the same
KeyboardInterrupt path by :func:`interrupt_on_sigterm`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional


class EngineError(RuntimeError):
    """The engine could not be started or did not finish; the message names what to do or read."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the process group of ``proc`` (its session), SIGKILL after ``grace_s``; reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Helpers of the group may outlive the leader; the group id is the leader's pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def log_tail(log: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln]
    return " | ".join((errors or lines)[-n:])[-400:]


@contextlib.contextmanager
def started(cmd: List[str], env: Dict[str, str], log: Path, cwd: Optional[str] = None) -> Iterator:
    """Run ``cmd`` (output to ``log``) in its own session; stopped on leaving the block, whatever happens."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop(proc)


def run_to_end(cmd: List[str], env: Dict[str, str], log: Path, timeout_s: float, what: str) -> None:
    """Run ``cmd`` to completion; on a non-zero exit or timeout raise EngineError pointing at ``log``."""
    with started(cmd, env, log) as proc:
        try:
            rc = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{what} did not finish within {timeout_s:.0f} s; read {log}") from None
    if rc != 0:
        raise EngineError(f"{what} failed (exit {rc}): {log_tail(log)}; full log: {log}")


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail early, with the log, if the process dies first."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EngineError(
                f"{what} exited (code {proc.returncode}) before serving: {log_tail(log)}; log: {log}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise EngineError(f"{what} did not answer {url} within {timeout_s:.0f} s; read {log}")


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt, so ``finally`` clean-ups run on both."""

    def raise_interrupt(_sig, _frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
