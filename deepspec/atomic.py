"""Atomic writes: a reader, or a rerun after a kill, sees the old file or the new one, never half of one.

Every file deepspec writes that someone may read later goes through here. The recipe is the usual one:
write a temporary file in the same folder (so the final rename stays on one file system), flush and
fsync it, ``os.replace`` it over the destination, then fsync the folder so the rename itself survives
a power cut. Folders (checkpoints, exports, the tiny target) are filled under a temporary name and
renamed into place the same way, by :func:`staged_dir`.

Temporary names start with a dot and contain ``.tmp-`` (files) or ``.staging-`` (folders), so the
stages that clean up after a killed run can find them (``STALE_GLOBS``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]

# Leftovers of a writer that was killed: never valid, safe to delete before a stage starts again.
STALE_GLOBS = (".*.tmp-*", ".*.staging-*", ".*.old-*")


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Read once: os.umask can only be read by setting it, which would race with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _share(path: Path) -> None:
    """mkstemp/mkdtemp make owner-only entries; what we write is meant to be read like any file."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())


def fsync(path: PathLike) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an exception, the file
    written there replaces ``path``. For writers that insist on a file name (``safetensors.save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        _share(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_open(path: PathLike, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[Any]:
    """``open()`` for writing that only replaces ``path`` once the block has finished without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode {mode!r}: expected 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: PathLike, obj: Any, *, sort_keys: bool = False, indent: Optional[int] = 2) -> None:
    """JSON with a final newline. Serialising happens before the file is touched, so an object that
    cannot be written (NaN is allowed, a set is not) leaves the old file alone."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[Dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped)."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_tensors(path: PathLike, tensors: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """A safetensors file. The bytes depend only on the tensors and ``metadata`` (cache shards are
    compared by checksum between runs)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def writer_tag() -> str:
    """``<host>-<pid>-``: part of every stage's name, so a later run can tell the leftovers of a dead
    writer from the folder of one still running (deepspec.exporting.io.clean_leftovers)."""
    return f"{socket.gethostname()}-{os.getpid()}-"


@contextmanager
def staged_dir(final: PathLike, *, replace: bool = True, fault: Optional[str] = None) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; when the block succeeds it becomes ``final`` in one rename.

    Everything inside is fsynced before the rename. An existing ``final`` is moved aside first and
    deleted afterwards (``replace=True``); with ``replace=False`` a ``final`` that appeared meanwhile
    (another process finished the same work) is kept and :class:`FileExistsError` is raised. On an
    exception, or a kill, ``final`` is left as it was and the stage is removed (or, after a kill,
    left for :func:`remove_stale` to find). ``fault``: the name of the fault points
    ``kill_in_<fault>`` (stage complete) and ``kill_in_<fault>_swap`` (old one moved aside) of the
    fault-injection tests (deepspec/training/faults.py).
    """
    from deepspec.training.faults import maybe_kill

    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-{writer_tag()}"))
    try:
        yield stage
        for p in sorted(stage.rglob("*"), reverse=True):  # children before their folder
            if not p.is_symlink():
                _share(p)
                fsync(p)
        _share(stage)
        fsync(stage)
        if fault:
            maybe_kill(f"kill_in_{fault}", 0)
        old = None
        if final.exists() or final.is_symlink():
            if not replace:
                raise FileExistsError(f"{final} already exists")
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-{writer_tag()}"))
            os.replace(final, old / final.name)
            if fault:
                maybe_kill(f"kill_in_{fault}_swap", 0)
        os.replace(stage, final)
        fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def build_lock(path: PathLike, on_wait=None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block, waiting for it if another
    process holds it. For work several processes may start at once (two benchmark runs finding the
    same target unbuilt): the second waits, then finds the first one's result instead of redoing it.
    The kernel drops the lock when its holder dies, so a killed builder never blocks the next.
    ``on_wait()`` is called once if the lock is busy (to say why the caller is waiting)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_dir(path: PathLike) -> None:
    """Delete a folder so that it never looks half there: rename it aside first, then delete."""
    path = Path(path)
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale(folder: PathLike) -> list:
    """Delete what killed writers left in ``folder`` (temporary files and stages); returns the paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for pattern in STALE_GLOBS:
        for p in folder.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone
