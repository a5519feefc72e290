"""Careful file reads for exports: every failure names the broken file (writes: ``deepspec.atomic``).

Every reader here turns a low-level failure (bad JSON, truncated safetensors, a missing file) into an
:class:`ExportInputError` naming the file and what was expected, because the usual cause is an
unfinished training run or an interrupted copy, and the user needs to know which file to look at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

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
