"""Native DSpark checkpoint (docs/method.md, Export conventions): an HF-style folder, config.json + model.safetensors.

config.json is the target's config with the drafter's facts laid over it; the tensor names are the
drafter's own state_dict names, so saving is a dump and loading is a strict ``load_state_dict``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file

from deepspec import atomic
from deepspec.models import Drafter, build_drafter
from deepspec.models.config import DrafterSpec

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# DrafterSpec fields (same names in config.json) that describe the drafter's architecture and are read back from config.json.
_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "attention_bias",
)


def native_config(c: DrafterSpec, dtype: str = "bfloat16") -> Dict[str, Any]:
    """The native config.json: HF names where HF has one (``num_hidden_layers`` = the drafter's own
    layers), ``drafter_kind`` for the spec's ``kind``. :func:`config_from_native` is its inverse."""
    cfg = dict(c.target_config)
    cfg.update(
        architectures=["Qwen3DSparkModel"],
        model_type=c.model_type,
        num_hidden_layers=c.num_layers,
        drafter_kind=c.kind,
        num_target_layers=c.num_target_layers,
        block_size=c.block_size,
        mask_token_id=c.mask_token_id,
        target_layer_ids=list(c.target_layer_ids),
        num_anchors=c.num_anchors,
        markov_rank=c.markov_rank,
        markov_head_type=c.markov_head_type,
        enable_confidence_head=c.enable_confidence_head,
        confidence_head_with_markov=c.confidence_head_with_markov,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        dtype=dtype,  # transformers 5 reads `dtype`; the target's own value would be stale here
        rope_theta=c.rope_theta,
    )
    if c.kind == "eagle3":  # the EAGLE-3 baseline: same folder layout, its own architecture tag
        cfg.update(architectures=["DeepSpecEagle3Model"])
    cfg.pop("layer_types", None)  # the target's per-layer list has the target's length, not the drafter's
    for k in _ARCH_KEYS:
        cfg[k] = getattr(c, k)
    if c.sts_temperatures is not None:
        cfg["sts_temperatures"] = list(c.sts_temperatures)
    return cfg


def config_from_native(cfg: Dict[str, Any]) -> DrafterSpec:
    missing = [
        k for k in ("num_target_layers", "target_layer_ids", "block_size", "mask_token_id") if k not in cfg
    ]
    if missing:
        raise ValueError(f"config.json is not a native DSpark config: missing keys {missing}")
    target = dict(cfg)
    for k in (
        "architectures",
        "num_target_layers",
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "num_anchors",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "confidence_head_with_markov",
        "sts_temperatures",
        "drafter_kind",
        "drafter_architecture",
    ):
        target.pop(k, None)
    target["num_hidden_layers"] = cfg["num_target_layers"]
    return DrafterSpec(
        model_type=cfg.get("model_type", "qwen3"),
        **{k: cfg[k] for k in _ARCH_KEYS},
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        use_qk_norm=cfg.get("model_type", "qwen3") == "qwen3",
        num_layers=int(cfg["num_hidden_layers"]),
        num_target_layers=int(cfg["num_target_layers"]),
        target_hidden_size=int(cfg["hidden_size"]),
        target_layer_ids=[int(i) for i in cfg["target_layer_ids"]],
        block_size=int(cfg["block_size"]),
        mask_token_id=int(cfg["mask_token_id"]),
        num_anchors=int(cfg.get("num_anchors", 512)),
        markov_rank=int(cfg.get("markov_rank", 0)),
        markov_head_type=cfg.get("markov_head_type", "vanilla"),
        enable_confidence_head=bool(cfg.get("enable_confidence_head", False)),
        confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", True)),
        sts_temperatures=cfg.get("sts_temperatures"),
        # drafter_architecture: the key's name in exports written before drafter_kind (dspark|eagle3).
        kind=cfg.get("drafter_kind", cfg.get("drafter_architecture", "dspark")),
        target_config=target,
    )


def save_native(drafter: Drafter, out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write config.json + model.safetensors into ``out_dir`` (each file atomically)."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in drafter.state_dict().items()}
    atomic.write_tensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    atomic.write_json(out / "config.json", native_config(drafter.config, dtype), sort_keys=True)
    return out


def load_native(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Drafter:
    p = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise FileNotFoundError(f"{p / name} not found: not a native DSpark drafter folder")
    cfg = config_from_native(json.loads((p / "config.json").read_text()))
    drafter = build_drafter(cfg)
    state = load_file(str(p / "model.safetensors"))
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{p / 'model.safetensors'}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    drafter.freeze_target_head()
    return drafter.to(device=device, dtype=dtype).eval()
