"""Drafter layer families: one registered entry per family of target a drafter can copy.

A family says which target ``model_type``s it serves, how to read the layer facts a drafter copies
from the target's (text) config, and how its drafter is exported. Adding a family is one
:func:`register` call here plus, when its layers differ, a layer class (``gemma4.py``). What each
family copies and which exports it supports is listed in docs/families.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from deepspec.models.rope import check_rope, rope_parameters_of

DEFAULT_MAX_POSITIONS = 32768


@dataclass(frozen=True)
class Family:
    name: str  # the drafter layers' model_type, as exports write it
    target_model_types: Tuple[str, ...]  # target (text) model_types whose drafter this family builds
    arch: Callable[[Dict[str, Any]], Dict[str, Any]]  # target text config -> the spec's layer fields
    native_architecture: str  # architectures[0] of the native export
    layers: str  # module defining the family's LAYER and NORM classes
    formats: Tuple[str, ...]  # export formats that can describe these layers
    eagle3: bool  # whether the EAGLE-3 baseline has layers of this family


FAMILIES: Dict[str, Family] = {}


def layer_classes(family: Family):
    """(decoder layer class, RMSNorm class) of a family; imported here, when a drafter is built."""
    import importlib

    mod = importlib.import_module(family.layers)
    return mod.LAYER, mod.NORM


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def supported_target_types() -> Tuple[str, ...]:
    return tuple(t for f in FAMILIES.values() for t in f.target_model_types)


def family_for_target(model_type: str) -> Family:
    for f in FAMILIES.values():
        if model_type in f.target_model_types:
            return f
    raise ValueError(
        f"target model_type {model_type!r} has no drafter layer family; supported target model_types: "
        f"{supported_target_types()} (docs/families.md)"
    )


def family_named(name: str) -> Family:
    if name in FAMILIES:
        return FAMILIES[name]
    return family_for_target(name)  # specs written before the registry carried the target's type


def text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The language-model part of a target config (multimodal configs nest it as ``text_config``)."""
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        return dict(cfg["text_config"])
    return dict(cfg)


def _get(t: Dict[str, Any], key: str, default: Any) -> Any:
    v = t.get(key)
    return default if v is None else v


def _refuse(t: Dict[str, Any], family: str, key: str, allowed, why: str) -> None:
    if key in t and t[key] is not None and t[key] not in allowed:
        raise ValueError(
            f"target config {key}={t[key]!r} cannot be honoured by the {family} drafter layers ({why}); "
            f"supported values: {list(allowed)}"
        )


def _activation(t: Dict[str, Any], key: str, default: str, family: str) -> str:
    from transformers.activations import ACT2FN

    act = str(_get(t, key, default))
    if act not in ACT2FN:
        raise ValueError(
            f"target config {key}={act!r} is not an activation the {family} drafter layers know; "
            f"supported values: {sorted(ACT2FN)}"
        )
    return act


def _rope(t: Dict[str, Any], layer_type: Optional[str] = None) -> Dict[str, Any]:
    rope = rope_parameters_of(t, layer_type)
    check_rope(rope)
    return rope


def _common(t: Dict[str, Any]) -> Dict[str, Any]:
    heads, hidden = int(t["num_attention_heads"]), int(t["hidden_size"])
    return dict(
        vocab_size=int(t["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(t["intermediate_size"]),
        num_attention_heads=heads,
        num_key_value_heads=int(_get(t, "num_key_value_heads", heads)),
        head_dim=int(_get(t, "head_dim", hidden // heads)),
        rms_norm_eps=float(_get(t, "rms_norm_eps", 1e-6)),
        attention_bias=bool(_get(t, "attention_bias", False)),
        max_position_embeddings=int(_get(t, "max_position_embeddings", DEFAULT_MAX_POSITIONS)),
    )


def _qwen3_arch(t: Dict[str, Any]) -> Dict[str, Any]:
    rope = _rope(t)
    return dict(
        _common(t),
        model_type="qwen3",  # a Qwen3-MoE target gets a dense Qwen3 drafter
        use_qk_norm=True,
        hidden_act=_activation(t, "hidden_act", "silu", "qwen3"),
        rope_parameters=rope,
        rope_theta=float(rope["rope_theta"]),
    )


def _llama_arch(t: Dict[str, Any]) -> Dict[str, Any]:
    _refuse(t, "llama", "mlp_bias", (False,), "the drafter's MLP has no biases")
    rope = _rope(t)
    return dict(
        _common(t),
        model_type=str(t.get("model_type") or "llama"),
        use_qk_norm=False,
        hidden_act=_activation(t, "hidden_act", "silu", "llama"),
        rope_parameters=rope,
        rope_theta=float(rope["rope_theta"]),
    )


def _full_attention_override(t: Dict[str, Any]) -> Dict[str, Any]:
    """Per-layer overrides of the target's first full-attention layer (transformers 5 keeps Gemma 4's
    global head dim and kv heads there instead of ``global_head_dim`` / ``num_global_key_value_heads``)."""
    types = t.get("layer_types") or []
    per_layer = {int(k): v for k, v in (t.get("per_layer_config") or {}).items() if str(k).isdigit()}
    for i, kind in enumerate(types):
        if kind == "full_attention":
            return dict(per_layer.get(i) or {})
    return {}


def _gemma4_arch(t: Dict[str, Any]) -> Dict[str, Any]:
    over = _full_attention_override(t)
    head_dim = int(_get(t, "global_head_dim", over.get("head_dim") or t["head_dim"]))
    k_eq_v = bool(_get(t, "attention_k_eq_v", False))
    kv = int(t["num_key_value_heads"])
    if k_eq_v:
        kv = int(_get(t, "num_global_key_value_heads", over.get("num_key_value_heads") or kv))
    heads = int(t["num_attention_heads"])
    if heads % kv:
        raise ValueError(
            f"target config num_attention_heads={heads} is not a multiple of the full-attention kv heads {kv}"
        )
    softcap = t.get("final_logit_softcapping")
    if softcap is not None and float(softcap) <= 0:
        raise ValueError(
            f"target config final_logit_softcapping={softcap}: expected a positive number or null"
        )
    rope = _rope(t, "full_attention")  # drafter layers are full-attention layers, as in DeepSpec's
    return dict(
        _common(t),
        model_type="gemma4_text",
        num_key_value_heads=kv,
        head_dim=head_dim,
        use_qk_norm=True,
        hidden_act=_activation(t, "hidden_activation", "gelu_pytorch_tanh", "gemma4"),
        rope_parameters=rope,
        rope_theta=float(rope["rope_theta"]),
        attention_k_eq_v=k_eq_v,
        attn_scale=1.0,  # Gemma 4 attention does not divide scores by sqrt(head_dim)
        embed_scale=math.sqrt(int(t["hidden_size"])),
        final_logit_softcapping=None if softcap is None else float(softcap),
    )


register(
    Family(
        name="qwen3",
        target_model_types=("qwen3", "qwen3_moe"),
        arch=_qwen3_arch,
        native_architecture="Qwen3DSparkModel",
        layers="deepspec.models.layers",
        formats=("native", "speculators", "dflash"),
        eagle3=True,
    )
)
register(
    Family(
        name="llama",
        target_model_types=("llama", "mistral", "qwen2"),
        arch=_llama_arch,
        native_architecture="LlamaDSparkModel",
        layers="deepspec.models.layers",
        formats=("native", "speculators", "dflash"),
        eagle3=True,
    )
)
register(
    Family(
        name="gemma4_text",
        target_model_types=("gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text"),
        arch=_gemma4_arch,
        native_architecture="Gemma4DSparkModel",
        layers="deepspec.models.gemma4",
        formats=("native", "speculators"),
        eagle3=False,
    )
)
