"""``target.shard=fsdp`` loading: each rank reads only its own rows of every weight.

Loading the whole target and then sharding it makes every rank hold the full target (and then its
shard) at start-up, so the peak is above the unsharded one even though the steady state is 1/world.
Here the model is built with its parameters on the meta device (no memory), FSDP2's ``fully_shard``
turns each into a ``Shard(0)`` DTensor, ``to_empty`` allocates just the local shards, and each local
shard is filled from the safetensors files with only its own rows, read straight into the shard
(:mod:`deepspec.target.safetensors_rows`; ``safe_open(...).get_slice`` would memory-map each file,
and the mapped pages count in the rank's memory until the file closes). FSDP2 chunks dim 0 like
``torch.chunk``: ``ceil(rows / world)`` rows per rank, the last ranks get fewer (or none); its
padding lives in storage this module never touches.

Buffers (rotary ``inv_freq``, embedding scales...) are computed by the model's own ``__init__`` on a
real device (only parameters go to meta), kept across ``to_empty`` (which would leave them as
uninitialised memory), and replaced by the checkpoint's value when the checkpoint stores one.

Parameters are matched to checkpoint tensors by name. A checkpoint whose names transformers converts
on load (fused experts, renamed prefixes) is refused by name of the missing tensor.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from deepspec.target.loading import PICKLE_SUFFIXES, TargetLoadError
from deepspec.target.safetensors_rows import SafetensorsFile

INDEX = "model.safetensors.index.json"
WHAT = "target.shard=fsdp"


def shard_rows(rows: int, rank: int, world: int) -> Tuple[int, int]:
    """Rows [start, stop) of dim 0 that FSDP2's Shard(0) gives ``rank`` (torch.chunk's split)."""
    per = -(-rows // world)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


def weights_folder(path: str) -> Path:
    """The local folder holding the safetensors weights (a Hub id is fetched: safetensors and JSON only)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # network, auth, unknown repo: one message naming the id
        raise TargetLoadError(f"{WHAT}: could not fetch the safetensors weights of {path!r}: {e}") from e


def weight_files(folder: Path) -> Dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index when the weights are split)."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            items = [(str(k), str(v)) for k, v in weight_map.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise TargetLoadError(
                f"{index}: not a safetensors index ({type(e).__name__}: {e}); expected a JSON object whose "
                "'weight_map' maps tensor names to .safetensors files"
            ) from e
        files = {}
        for key, name in items:
            if not (folder / name).is_file():
                raise TargetLoadError(f"{index}: tensor {key!r} is in {name!r}, which is not in {folder}")
            files[key] = folder / name
        return files
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        also = (
            f" (found only {', '.join(pickles)}: pickle files, which deepspec never loads)" if pickles else ""
        )
        raise TargetLoadError(f"{WHAT}: {folder} has no *.safetensors weights{also}")
    files = {}
    for f in found:
        files.update(dict.fromkeys(SafetensorsFile(f).keys(), f))
    return files


def build_empty(path: str, dtype: str, trust_remote_code: bool):
    """The model of ``path``'s config with parameters on the meta device and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from deepspec.target.adapter import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"target.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[dtype], trust_remote_code=bool(trust_remote_code)
        )
    model.tie_weights()  # init_empty_weights re-creates each parameter, which unties shared ones
    return model


def _tensors(module: torch.nn.Module, buffers: bool) -> List[Tuple[torch.Tensor, List[str]]]:
    """Each distinct parameter (or buffer) with all the names it has (tied weights have several)."""
    named = (
        module.named_buffers(remove_duplicate=False)
        if buffers
        else module.named_parameters(remove_duplicate=False)
    )
    by_id: Dict[int, Tuple[torch.Tensor, List[str]]] = {}
    for name, t in named:
        by_id.setdefault(id(t), (t, []))[1].append(name)
    return list(by_id.values())


def _fill(t: torch.Tensor, f: SafetensorsFile, key: str) -> None:
    from torch.distributed.tensor import DTensor

    _, shape, _ = f.info(key)
    if list(shape) != list(t.shape):
        raise TargetLoadError(
            f"{f.path}: tensor {key!r} has shape {list(shape)}; the model built from config.json expects "
            f"{list(t.shape)}"
        )
    if not isinstance(t, DTensor):  # a buffer, or a parameter FSDP did not shard
        f.read_rows(key, 0, shape[0] if shape else 0, t.data)
        return
    local = t.to_local()
    start, stop = shard_rows(shape[0], t.device_mesh.get_local_rank(), t.device_mesh.size())
    if len(t.placements) != 1 or not t.placements[0].is_shard(0) or local.shape[0] != stop - start:
        raise RuntimeError(
            f"{WHAT}: {key}: expected a Shard(0) shard of rows {start}:{stop}, got placements "
            f"{t.placements} with {local.shape[0]} local rows"
        )
    f.read_rows(key, start, stop, local)  # converts the checkpoint's dtype to target.dtype


@torch.no_grad()
def fill_from_safetensors(model: torch.nn.Module, folder: Path, buffers: Dict[str, torch.Tensor]) -> None:
    """Every parameter's local shard, and every buffer the checkpoint stores, from ``folder``."""
    files = weight_files(folder)
    todo: Dict[Path, List[Tuple[str, torch.Tensor]]] = defaultdict(list)
    missing = []
    for param, names in _tensors(model, buffers=False):
        key = next((n for n in names if n in files), None)
        if key is None:
            missing.append(names[0])
        else:
            todo[files[key]].append((key, param))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TargetLoadError(
            f"{WHAT}: the safetensors files in {folder} hold no tensor named {missing[:5]}{more}. Sharded "
            "loading reads parameters by their transformers names; a checkpoint whose names transformers "
            "converts on load (fused experts, renamed prefixes) cannot be sharded this way: use "
            "target.shard=none"
        )
    for buf, names in _tensors(model, buffers=True):
        key = next((n for n in names if n in files), None)
        if key is not None:
            todo[files[key]].append((key, buf))
        else:  # computed by the model's __init__ (non-persistent, e.g. rotary inv_freq)
            buf.copy_(buffers[names[0]])
    for path, items in todo.items():
        f = SafetensorsFile(path)
        for key, t in items:
            _fill(t, f, key)


def load_sharded_target(
    path: str,
    layer_ids: Sequence[int],
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
):
    """A :class:`~deepspec.target.adapter.TargetModel` sharded over the default process group, each
    rank having read only its own shard of the weights. Collective: every rank calls it."""
    from deepspec.target.adapter import TargetModel
    from deepspec.target.sharding import shard_target

    folder = weights_folder(path)
    weight_files(folder)  # no weights, or a broken index: say so before building anything
    device = torch.device(device)
    target = TargetModel(build_empty(path, dtype, trust_remote_code), layer_ids)
    shard_target(target, device.type)
    buffers = {name: b.detach().to("cpu", copy=True) for name, b in target.model.named_buffers()}
    target.model.to_empty(device=device)
    fill_from_safetensors(target.model, folder, buffers)
    return target
