"""The run directory belongs to one run at a time, and holds only what that run really did.

- :class:`RunLock`: ``<output_dir>/run.lock`` (pid, host, start time, and what holds it: training,
  evaluation or export). A second writer (training, ``deepspec/evaluate.py`` or ``deepspec/export.py``
  on the same run) refuses to start, naming the holder; a lock whose process is gone (same host, pid
  not running) is taken over with a warning. A lock from another host cannot be checked and is never
  taken over.
- Provenance (``config.yaml``, ``.hydra/``, ``run_info.json``, ``train.log``) is written by
  :meth:`RunDir.commit`, called only after every start-up check (lock, resume compatibility) passed,
  so a refused start leaves an existing run's files byte for byte as they were. Log lines of the
  start-up are buffered until then.
- :func:`write_summary`: re-running a finished run (re-evaluation, re-export) keeps the training
  record in ``train_summary.json`` and appends the new evaluation to it.

Every config copy goes through :mod:`deepspec.secrets` (credentials are never written).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from deepspec import atomic, secrets
from deepspec.training.faults import maybe_kill

log = logging.getLogger("deepspec")

LOCK_NAME = "run.lock"
LOG_NAME = "train.log"
_LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunLockedError(RuntimeError):
    """Another live process owns the run directory."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive, stale-aware lock file. The file is created complete (written aside, then
    hard-linked into place), so a reader never sees half a lock."""

    def __init__(self, folder: Path, what: str = "training") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False
        self.what = what  # "training", "evaluation" or "export": named to whoever finds the lock taken
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp.write_text(json.dumps({**self.me, "started": started, "what": self.what}))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._take_over_if_stale(self.holder())
        finally:
            tmp.unlink(missing_ok=True)
        raise RunLockedError(f"could not take {self.path}: other processes keep taking it")

    def _take_over_if_stale(self, h: Optional[dict]) -> None:
        if h is None:  # released meanwhile
            return
        where = self.path.parent
        if not h or "pid" not in h:
            raise RunLockedError(
                f"{where} is locked by {self.path}, which is unreadable; if no training, evaluation or export "
                "uses this folder, delete the lock file and start again"
            )
        pid, host = int(h["pid"]), str(h.get("host", ""))
        ours = host == self.me["host"]
        if ours and (pid == os.getpid() or not pid_alive(pid)):
            stale = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.rename(self.path, stale)  # only one of several racing starters wins this rename
            except FileNotFoundError:
                return
            stale.unlink(missing_ok=True)
            log.warning(
                "taking over the stale lock of %s: process %d on %s (started %s) is no longer running",
                where,
                pid,
                host,
                h.get("started", "?"),
            )
            return
        where_run = f"process {pid} on this host" if ours else f"process {pid} on host {host!r}"
        advice = (
            "wait for it to finish or stop it"
            if ours
            else "this host cannot check whether it still runs; if it does not, delete the lock file"
        )
        other = (
            "or choose another run_name / train.output_dir" if self.what == "training" else "then run again"
        )
        raise RunLockedError(
            f"{where} is in use by another {h.get('what', 'training')} ({where_run}, started "
            f"{h.get('started', '?')}, lock {self.path}); {advice}, {other}. Nothing was written."
        )

    def release(self) -> None:
        if self.held:
            h = self.holder()
            if h and h.get("pid") == self.me["pid"] and h.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False


@contextmanager
def run_lock(folder: Optional[Path], what: str) -> Iterator[None]:
    """Hold ``folder``'s run lock for the block (``folder=None``: nothing to lock). For the commands that
    write into a finished run (evaluation, export) while a training may be writing there."""
    if folder is None:
        yield
        return
    lock = RunLock(Path(folder), what)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


class RunDir:
    """The main process's handle on ``train.output_dir``: lock, buffered log, provenance.

    Use as a context manager around the whole run; other ranks get one that does nothing."""

    def __init__(self, cfg, is_main: bool = True) -> None:
        self.cfg = cfg
        self.path = Path(cfg.train.output_dir)
        self.main = is_main
        self.lock = RunLock(self.path)
        self._buffer: Optional[logging.handlers.MemoryHandler] = None
        self._file: Optional[logging.Handler] = None

    def __enter__(self) -> RunDir:
        if self.main:
            self.lock.acquire()
            # Start-up log lines wait in memory: a refused start must not touch train.log.
            self._buffer = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1)
            self._buffer.setFormatter(logging.Formatter(_LOG_FORMAT))
            log.addHandler(self._buffer)
        return self

    def __exit__(self, *exc) -> None:
        for h in (self._buffer, self._file):
            if h is not None:
                log.removeHandler(h)
                h.close()
        self._buffer = self._file = None
        if self.main:
            self.lock.release()

    def commit(self, info: dict) -> None:
        """Every check passed: write config.yaml, .hydra/, run_info.json and start train.log."""
        if not self.main:
            return
        out = self.path
        atomic.write_text(out / "config.yaml", secrets.config_yaml(self.cfg))
        _write_hydra_record(out / ".hydra", self.cfg)
        atomic.write_text(out / "run_info.json", json.dumps(secrets.redact(info), indent=2))
        self._file = logging.FileHandler(out / LOG_NAME, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(_LOG_FORMAT))
        if self._buffer is not None:
            self._buffer.setTarget(self._file)
            self._buffer.flush()
            log.removeHandler(self._buffer)
            self._buffer.close()
            self._buffer = None
        log.addHandler(self._file)
        maybe_kill("kill_after_commit", 0)


def _write_hydra_record(folder: Path, cfg) -> None:
    """What Hydra would write into ``.hydra/`` (its own writing is off: it happens before any
    check and keeps credentials), redacted."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # composed without @hydra.main (tests, the API)
        return
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(folder / "config.yaml", secrets.config_yaml(cfg))
    task = list(hc.overrides.task)
    atomic.write_text(folder / "overrides.yaml", yaml.safe_dump(secrets.redact_overrides(task)))


# ----------------------------------------------------------------------------- the training record
def write_summary(out_dir: Path, result: dict, trained: bool, checkpoint_metrics: Optional[dict]) -> dict:
    """Write ``train_summary.json``. A run that trained writes its record; a re-run that trained no
    step (re-evaluate / re-export a finished run) keeps the earlier record, its evaluation included,
    and appends the new evaluation and export under ``reruns``. Returns what was written."""
    path = Path(out_dir) / "train_summary.json"
    if trained:
        record = dict(result)
    else:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        if not record:  # killed after the final checkpoint, before the summary: rebuild what is known
            record = {
                k: result[k] for k in ("train_steps", "resumed_from_step", "skipped_steps") if k in result
            }
            record["final_metrics"] = checkpoint_metrics or {}
            record["train_time_s"] = None
        rerun = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        rerun.update({k: result[k] for k in ("eval", "export") if k in result})
        record.setdefault("reruns", []).append(rerun)
    atomic.write_text(path, json.dumps(record, indent=2))
    return record
