"""Careful file reads for exports: every failure names the broken file (writes: ``deepspec.atomic``).

Every reader here turns a low-level failure (bad JSON, truncated safetensors, a missing file) into an
:class:`ExportInputError` naming the file and what was expected, because the usual cause is an
unfinished training run or an interrupted copy, and the user needs to know which file to look at.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

log = logging.getLogger("deepspec")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Tensors only deepspec reads (the greedy confidence output, docs/export.md): serving engines load
# every top-level *.safetensors file and refuse tensor names they do not know (vLLM's DSpark model
# does), so these go into a subfolder, which engines do not read.
EXTRA_WEIGHTS_NAME = "deepspec/extra.safetensors"
EXTRA_PREFIXES = ("confidence_head.greedy_proj.",)


def split_extra(tensors: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(tensors for model.safetensors, deepspec-only tensors for EXTRA_WEIGHTS_NAME)."""
    main = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIXES)}
    return main, {k: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIXES)}


def write_weights(folder: Path, tensors: Dict[str, Any]) -> None:
    """Write a drafter folder's tensors: model.safetensors, plus the deepspec-only file when any
    tensor belongs there (each file atomically)."""
    from deepspec import atomic

    main, extra = split_extra(tensors)
    atomic.write_tensors(Path(folder) / WEIGHTS_NAME, main, metadata={"format": "pt"})
    if extra:
        (Path(folder) / EXTRA_WEIGHTS_NAME).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_tensors(Path(folder) / EXTRA_WEIGHTS_NAME, extra, metadata={"format": "pt"})


def read_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """A drafter folder's tensors: model.safetensors plus the deepspec-only file when present."""
    state = read_tensors(Path(folder) / WEIGHTS_NAME)
    extra = Path(folder) / EXTRA_WEIGHTS_NAME
    return {**state, **read_tensors(extra)} if extra.is_file() else state


def weights_header(folder: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """:func:`tensor_header` over both files of a drafter folder."""
    header = tensor_header(Path(folder) / WEIGHTS_NAME)
    extra = Path(folder) / EXTRA_WEIGHTS_NAME
    return {**header, **tensor_header(extra)} if extra.is_file() else header


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


# Files only a training run writes: a folder holding one of them is a run, not an old export.
_RUN_MARKERS = ("run_info.json", "trainer_state.json", "train_summary.json", "run.lock", "metrics.jsonl")


def training_run_in(folder: Path, depth: int = 4) -> Optional[Path]:
    """The first training-run file found in ``folder`` (or up to ``depth`` levels below), else None."""
    root = len(folder.parts)
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for marker in _RUN_MARKERS:
            if marker in filenames:
                return here / marker
        if len(here.parts) - root >= depth:
            dirnames.clear()
    return None


def check_output_dir(
    out: Path, overwrite: bool, protected: Tuple[Path, ...] = (), overwrite_training_run: bool = False
) -> None:
    """Refuse a non-empty output folder unless overwriting, never one that holds an input, and never
    one that holds a training run unless ``overwrite_training_run``."""
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
    run = training_run_in(out) if out.is_dir() and overwrite and not overwrite_training_run else None
    if run is not None:
        raise ExportInputError(
            f"export.overwrite=true would delete {out}, which holds a training run ({run}); choose another "
            "export.output_dir, or also pass export.overwrite_training_run=true to delete it"
        )


def clean_leftovers(out: Path) -> None:
    """Remove what a killed export of ``out`` left next to it: its staging folder, and the folder the
    previous export was moved into during the final swap (put back first if ``out`` went missing).
    Folders of a writer still running, or of another host, are left alone."""
    from deepspec.training.run_dir import pid_alive

    host = socket.gethostname()
    for kind in ("staging", "old"):
        for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            m = re.match(rf"^\.{re.escape(out.name)}\.{kind}-(.+)-(\d+)-[^-]*$", p.name)
            if m and (m.group(1) != host or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2)))):
                continue
            if kind == "old" and not out.exists() and (p / out.name).is_dir():
                os.replace(p / out.name, out)
                log.warning("restored %s, which an interrupted export had moved aside", out)
            else:
                log.warning("removing %s, left by an interrupted export", p)
            shutil.rmtree(p, ignore_errors=True)
