"""Careful file I/O for exports: reads that name the broken file, writes that never leave half a folder.

Every reader here turns a low-level failure (bad JSON, truncated safetensors, a missing file) into an
:class:`ExportInputError` naming the file and what was expected, because the usual cause is an
unfinished training run or an interrupted copy, and the user needs to know which file to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ExportInputError(ValueError):
    """An input checkpoint or export folder is missing, unfinished or corrupted."""


def read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ExportInputError(f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportInputError(
            f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
            "the file is truncated or was not written by deepspec"
        ) from None
    if not isinstance(data, dict):
        raise ExportInputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def tensor_header(path: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """name -> (shape, dtype string such as 'BF16'), read from the header only (no tensor data)."""
    _require_file(path)
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(int(s) for s in sl.get_shape()), str(sl.get_dtype()))
    except Exception as e:  # safetensors raises its own error type; the message is what matters
        raise _corrupt(path, e) from None
    return out


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    _require_file(path)
    try:
        return load_file(str(path))
    except Exception as e:
        raise _corrupt(path, e) from None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ExportInputError(f"{path} not found (an unfinished run or an incomplete copy?)")


def _corrupt(path: Path, err: Exception) -> ExportInputError:
    size = path.stat().st_size if path.exists() else 0
    return ExportInputError(
        f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupted: {err})"
    )


def write_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Dict[str, Any], path: Path) -> None:
    from deepspec.exporting.native import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_output_dir(out: Path, overwrite: bool, protected: Tuple[Path, ...] = ()) -> None:
    """Refuse a non-empty output folder unless overwriting, and never one that holds an input."""
    out = out.resolve()
    for p in protected:
        p = p.resolve()
        if out == p or out in p.parents:
            raise ExportInputError(
                f"output folder {out} contains the input {p}; choose another export.output_dir"
            )
    if out.exists() and not out.is_dir():
        raise ExportInputError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportInputError(
            f"output folder {out} exists and is not empty; pass export.overwrite=true to replace it"
        )


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to fill; on success it replaces ``out`` in one rename.

    A crash or an exception leaves ``out`` as it was (a reader never sees half an export).
    """
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        yield stage
        _share(stage)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
        os.replace(stage, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _share(folder: Path) -> None:
    """mkstemp/mkdtemp create owner-only files; an export is meant to be read by others (umask applies)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
