"""Native drafter checkpoint of any kind (docs/method.md, Export conventions; per family
docs/families.md): an HF-style folder, config.json + model.safetensors.

config.json is the target's config with the drafter's facts laid over it; the tensor names are the
drafter's own state_dict names, so saving is a dump and loading is a strict ``load_state_dict``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict

import torch

from deepspec import atomic
from deepspec.models import Drafter, build_drafter
from deepspec.models.config import DrafterSpec, normalise_sts
from deepspec.models.families import family_named, text_config
from deepspec.models.vocab import check_maps

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}

# DrafterSpec fields (same names in config.json) that describe the drafter's architecture.
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
# Keys of the native config.json that are the drafter's, not the target's.
DRAFTER_KEYS = (
    "architectures",
    "draft_vocab_size",
    "num_target_layers",
    "block_size",
    "mask_token_id",
    "target_layer_ids",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "greedy_confidence",
    "sts_temperatures",
    "sts_by_temperature",
    "drafter_kind",
    "drafter_architecture",
    "target_model_type",
    "target_text_model_type",
)


def gemma4_keys(c: DrafterSpec, t: Dict[str, Any]) -> Dict[str, Any]:
    """The Gemma 4 text-config keys DeepSpec's Gemma4DSparkModel reads: the full-attention head dim and
    kv heads spelled out (transformers 5 keeps them per layer), and the dense, PLE-free block."""
    return dict(
        global_head_dim=c.head_dim,
        num_global_key_value_heads=c.num_key_value_heads,
        head_dim=int(t.get("head_dim") or c.head_dim),  # the target's sliding-layer head dim, unused here
        num_key_value_heads=int(t.get("num_key_value_heads") or c.num_key_value_heads),
        attention_k_eq_v=c.attention_k_eq_v,
        final_logit_softcapping=c.final_logit_softcapping,
        enable_moe_block=False,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
    )


def native_config(c: DrafterSpec, dtype: str = "bfloat16") -> Dict[str, Any]:
    """The native config.json, laid out as DeepSpec's own model classes load it (docs/families.md):
    the target's (text) config with the drafter's keys over it, HF names where HF has one
    (``num_hidden_layers`` = the drafter's own layers), ``drafter_kind`` for the spec's ``kind``.
    :func:`config_from_native` is its inverse."""
    family = c.family
    t = text_config(c.target_config)
    cfg = dict(t)
    cfg.pop("per_layer_config", None)  # indexed by target layer: the drafter's layers are all full attention
    cfg.update({k: getattr(c, k) for k in _ARCH_KEYS})
    cfg.update(
        architectures=[family.native_architecture if c.kind != "eagle3" else "DeepSpecEagle3Model"],
        model_type=c.model_type,
        target_model_type=str(c.target_config.get("model_type") or c.model_type),
        target_text_model_type=str(t.get("model_type") or c.model_type),
        num_hidden_layers=c.num_layers,
        layer_types=["full_attention"] * c.num_layers,
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
        greedy_confidence=c.greedy_confidence,
        # The output layer's rows (vLLM's meaning): vocab_size when the drafter has the whole vocabulary.
        draft_vocab_size=c.out_vocab_size,
        tie_word_embeddings=False,
        torch_dtype=dtype,
        dtype=dtype,  # transformers 5 reads `dtype`; the target's own value would be stale here
    )
    if family.name == "gemma4_text":
        # rope_parameters stay per layer type: the drafter's layers read the full_attention one.
        cfg.update(gemma4_keys(c, t))
    else:
        # Exactly the RoPE the drafter was trained with (scaling included).
        cfg.update(rope_parameters=c.rope, rope_theta=c.rope_theta)
        cfg.pop("rope_scaling", None)
    cfg.update(sts_config(c))
    return cfg


def sts_config(c: DrafterSpec) -> Dict[str, Any]:
    """The STS keys of every format's config.json: the per-decoding-temperature fits, and the legacy
    single list when the drafter still carries one."""
    out: Dict[str, Any] = {}
    if c.sts_by_temperature:
        out["sts_by_temperature"] = normalise_sts(c.sts_by_temperature, c.block_size)
    if c.sts_temperatures is not None:
        out["sts_temperatures"] = list(c.sts_temperatures)
    return out


def config_from_native(cfg: Dict[str, Any]) -> DrafterSpec:
    missing = [
        k for k in ("num_target_layers", "target_layer_ids", "block_size", "mask_token_id") if k not in cfg
    ]
    if missing:
        raise ValueError(f"config.json is not a native DSpark config: missing keys {missing}")
    model_type = str(cfg.get("model_type") or "qwen3")
    arch = family_named(model_type).arch(cfg)
    target = {k: v for k, v in cfg.items() if k not in DRAFTER_KEYS}
    target["num_hidden_layers"] = cfg["num_target_layers"]
    target["model_type"] = cfg.get("target_text_model_type", model_type)
    return DrafterSpec(
        **arch,
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
        # Absent in drafters saved before the greedy output: their one output is the sampling one.
        greedy_confidence=bool(cfg.get("greedy_confidence", False)),
        sts_temperatures=cfg.get("sts_temperatures"),
        sts_by_temperature=cfg.get("sts_by_temperature"),
        draft_vocab_size=draft_vocab_from(cfg, int(arch["vocab_size"])),
        # drafter_architecture: the key's name in exports written before drafter_kind (dspark|eagle3).
        kind=cfg.get("drafter_kind", cfg.get("drafter_architecture", "dspark")),
        target_config=target,
    )


def draft_vocab_from(cfg: Dict[str, Any], vocab_size: int) -> int:
    """``model.draft_vocab_size`` from a config's ``draft_vocab_size`` (absent or = vocab_size: 0, whole)."""
    d = int(cfg.get("draft_vocab_size") or 0)
    return d if 0 < d < vocab_size else 0


def export_tensor(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A state-dict tensor as written: weights in the export dtype, the int64/bool vocabulary maps as they are."""
    v = v.detach().to("cpu")
    return (v.to(dtype) if v.is_floating_point() else v).contiguous()


def check_drafter_maps(drafter: Drafter, where: str) -> None:
    if drafter.config.pruned:
        check_maps(drafter.d2t, drafter.t2d, drafter.config.vocab_size, where)


def save_native(drafter: Drafter, out_dir: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Write config.json + model.safetensors into ``out_dir`` (each file atomically)."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from deepspec.exporting.io import write_weights

    write_weights(out, {k: export_tensor(v, DTYPES[dtype]) for k, v in drafter.state_dict().items()})
    atomic.write_json(out / "config.json", native_config(drafter.config, dtype), sort_keys=True)
    return out


def load_native(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Drafter:
    p = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise FileNotFoundError(
                f"{p / name} not found: not a native drafter folder (DSpark, DFlash or EAGLE-3)"
            )
    from deepspec.exporting.io import read_json, read_weights

    # Both readers name the file when it is truncated or damaged (not a bare JSON / safetensors error).
    cfg = config_from_native(read_json(p / "config.json"))
    drafter = build_drafter(cfg)
    state = read_weights(p)
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{p / 'model.safetensors'}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    check_drafter_maps(drafter, str(p / "model.safetensors"))
    drafter.freeze_target_head()
    return drafter.to(device=device, dtype=dtype).eval()
