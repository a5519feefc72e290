"""RNG state of a rank (torch, CUDA, python, numpy) as safetensors tensors + string metadata, so a
checkpoint stores it without pickling and reads it back with safetensors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": json.dumps(_jsonable(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (
            torch.from_numpy(keys.astype("int64")),
            json.dumps([name, int(pos), int(has_gauss), float(cached)]),
        )
    except ImportError:
        pass
    return state


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def rng_tensors(state: dict):
    tensors = {"torch": state["torch"]}
    meta = {"python": state["python"]}
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"cuda.{i}"] = s
    if "numpy" in state:
        tensors["numpy.keys"], meta["numpy"] = state["numpy"]
    return tensors, meta


def restore_rng(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    torch.set_rng_state(tensors["torch"])
    random.setstate(_tuplify(json.loads(meta["python"])))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy.keys" in tensors and "numpy" in meta:
        import numpy as np

        name, pos, has_gauss, cached = json.loads(meta["numpy"])
        np.random.set_state((name, tensors["numpy.keys"].numpy().astype("uint32"), pos, has_gauss, cached))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
