"""The three checkpoint formats (docs/method.md, Export conventions), each one pair of mapping functions to/from DrafterSpec.

Layer ids, mask id, block size and the head settings live only in :class:`DrafterSpec`; each
format's config.json is *derived* from it here, and read back into it here, so they cannot drift.
Tensor names are the drafter's own ``state_dict`` names in every format; formats differ only in
which tensors they carry (the z-lab format and "embeddings omitted" exports drop the frozen
embedding and lm_head, which engines share from the verifier).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from deepspec.config import ExportFormat, allowed, check_choice
from deepspec.exporting.io import ExportInputError
from deepspec.exporting.native import (
    config_from_native,
    draft_vocab_from,
    gemma4_keys,
    native_config,
    sts_config,
)
from deepspec.models.config import DrafterSpec
from deepspec.models.families import family_named

FORMATS = allowed(ExportFormat)
EMBED_KEYS = ("embed_tokens.weight", "lm_head.weight")

# Our drafter feeds [anchor, MASK × (γ-1)] and block slot j predicts token p0+j+1: the anchor's own
# output is the first draft (docs/method.md, Block and mask token). An engine must therefore sample draft 1 from the anchor
# position, not from the first MASK position as DFlash-style runtimes do. Written explicitly
# because engines default to the other convention and then serve at <1% acceptance, silently.
SAMPLE_FROM_ANCHOR = True

_ARCH = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "attention_bias",
)
# Keys that describe the target's identity or training bookkeeping, not the drafter's layers.
_NOT_LAYER_KEYS = (
    "architectures",
    "_name_or_path",
    "auto_map",
    "id2label",
    "label2id",
    "layer_types",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "rope_theta",
    "text_config",
    "num_target_layers",
    "target_layer_ids",
    "block_size",
    "mask_token_id",
    "num_anchors",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "greedy_confidence",
    "sts_temperatures",
    "sts_by_temperature",
    "sample_from_anchor",
    "dflash_config",
    "per_layer_config",
    "rope_scaling",
    "target_model_type",
    "target_text_model_type",
    "drafter_kind",
    "draft_vocab_size",
)
# Markov heads each format's runtime computes (the native format is DeepSpec's: all of them).
MARKOV_HEADS_BY_FORMAT = {"native": ("vanilla", "gated", "rnn"), "speculators": ("vanilla",), "dflash": ()}


class FormatError(ValueError):
    """The drafter cannot be written in the requested format (e.g. a Markov head in z-lab DFlash)."""


def verifier_name(c: DrafterSpec) -> str:
    return str(c.target_config.get("_name_or_path") or "")


def verifier_architectures(c: DrafterSpec) -> List[str]:
    archs = c.target_config.get("architectures")
    if archs:
        return list(archs)
    return [
        {
            "qwen3": "Qwen3ForCausalLM",
            "llama": "LlamaForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "mistral": "MistralForCausalLM",
        }.get(c.model_type, "AutoModelForCausalLM")
    ]


def transformer_layer_config(c: DrafterSpec, dtype: str) -> Dict[str, Any]:
    """A complete HF config dict of the drafter's own decoder layers (qwen3, llama, gemma4_text...)."""
    from transformers import CONFIG_MAPPING

    from deepspec.models.families import text_config

    t = text_config(c.target_config)
    base = {k: v for k, v in t.items() if k not in _NOT_LAYER_KEYS}
    base.update({k: getattr(c, k) for k in _ARCH})
    base.update(
        model_type=c.model_type,
        num_hidden_layers=c.num_layers,
        layer_types=["full_attention"] * c.num_layers,
        tie_word_embeddings=False,
    )
    gemma = c.family.name == "gemma4_text"
    if gemma:
        base.update(gemma4_keys(c, t))
    else:
        base["rope_parameters"] = c.rope  # exactly the RoPE that was trained, scaling included
    # Round-trip through transformers so the dict is complete (every field the family defines).
    full = CONFIG_MAPPING[c.model_type](**{k: v for k, v in base.items() if k != "model_type"}).to_dict()
    full.pop("architectures", None)
    if gemma:  # also spelled out, for readers that predate transformers' per-layer overrides
        full.update(global_head_dim=c.head_dim, num_global_key_value_heads=c.num_key_value_heads)
    full["dtype"] = dtype
    return full


def _arch_from_layer(d: Dict[str, Any], where: str) -> Dict[str, Any]:
    missing = [
        k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads") if k not in d
    ]
    if missing:
        raise ExportInputError(f"{where}: missing drafter architecture keys {missing}")
    arch = family_named(str(d.get("model_type") or "qwen3")).arch(d)
    return dict(arch, num_layers=int(d.get("num_hidden_layers", 1)))


def check_format_carries(c: DrafterSpec, fmt: str) -> None:
    """Refuse, naming the field and the supported values, a drafter ``fmt`` cannot describe: a file that
    loads and then computes something else in the engine is worse than no file."""
    family = c.family
    if fmt not in family.formats:
        raise FormatError(
            f"export.format={fmt} cannot describe {family.name} drafter layers (target model_type "
            f"{c.target_config.get('model_type', c.model_type)!r}); formats for this family: {list(family.formats)}"
        )
    if c.markov_enabled:
        check_markov_head(c.markov_head_type, fmt)
    if c.pruned and fmt == "dflash":
        raise FormatError(
            f"export.format=dflash cannot carry a draft vocabulary (model.draft_vocab_size="
            f"{c.draft_vocab_size}): the z-lab DFlash format has no d2t/t2d maps and shares the target's "
            "whole lm_head. Export with export.format=native or speculators, or train with "
            "model.draft_vocab_size=0"
        )


def check_markov_head(head_type: str, fmt: str) -> None:
    """Refuse a Markov head type the format's runtime does not compute (the trainer asks before training)."""
    heads = MARKOV_HEADS_BY_FORMAT.get(fmt)
    if heads and head_type not in heads:
        raise FormatError(
            f"export.format={fmt} cannot carry model.markov_head_type={head_type!r}: its runtime "
            f"computes markov_head_type in {list(heads)} only, so the drafter would propose other tokens. "
            "Export with export.format=native (DeepSpec's format, all head types) or train with "
            "model.markov_head_type=vanilla"
        )


def _require(cfg: Dict[str, Any], keys, where: str) -> None:
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ExportInputError(f"{where}: missing required keys {missing}")


# --------------------------------------------------------------------------- native
def to_native(c: DrafterSpec, dtype: str) -> Dict[str, Any]:
    return native_config(c, dtype)


def from_native(cfg: Dict[str, Any], where: str = "config.json") -> DrafterSpec:
    _require(
        cfg,
        (
            "num_target_layers",
            "target_layer_ids",
            "block_size",
            "mask_token_id",
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "intermediate_size",
        ),
        where,
    )
    filled = {k: cfg.get(k) for k in _ARCH}
    filled["num_key_value_heads"] = filled["num_key_value_heads"] or cfg["num_attention_heads"]
    filled["head_dim"] = filled["head_dim"] or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    filled["rms_norm_eps"] = filled["rms_norm_eps"] or 1e-6
    filled["attention_bias"] = bool(filled["attention_bias"])
    return config_from_native({**cfg, **filled})


# --------------------------------------------------------------------------- vLLM speculators
def to_speculators(c: DrafterSpec, dtype: str) -> Dict[str, Any]:
    kind = c.kind
    cfg: Dict[str, Any] = {
        "architectures": ["DSparkSpeculator" if kind == "dspark" else "DFlashSpeculator"],
        "speculators_model_type": kind,
        "transformer_layer_config": transformer_layer_config(c, dtype),
        "speculators_config": {
            "algorithm": kind,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.block_size}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name(c), "architectures": verifier_architectures(c)},
        },
        # The layer-id +1 trap (docs/method.md, Export conventions): vLLM indexes hidden states with the embedding output at 0, so layer i's
        # output is aux id i+1 (our native ids use HF's hidden_states[i+1] convention instead).
        "aux_hidden_state_layer_ids": [i + 1 for i in c.target_layer_ids],
        "num_target_layers": c.num_target_layers,
        "mask_token_id": c.mask_token_id,
        "block_size": c.block_size,
        "target_hidden_size": c.target_hidden_size,
        # d2t (int64 offsets: target id = i + d2t[i]) and t2d (bool [V]) travel in the weights.
        "draft_vocab_size": c.out_vocab_size,
        "markov_rank": c.markov_rank,
        "markov_head_type": c.markov_head_type,
        "enable_confidence_head": c.enable_confidence_head,
        "confidence_head_with_markov": c.confidence_head_with_markov,
        "greedy_confidence": c.greedy_confidence,
        "sample_from_anchor": SAMPLE_FROM_ANCHOR,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    cfg.update(sts_config(c))
    return cfg


def from_speculators(cfg: Dict[str, Any], where: str = "config.json") -> DrafterSpec:
    _require(
        cfg, ("transformer_layer_config", "aux_hidden_state_layer_ids", "mask_token_id", "block_size"), where
    )
    layer = cfg["transformer_layer_config"]
    arch = _arch_from_layer(layer, f"{where}: transformer_layer_config")
    target_hidden = int(cfg.get("target_hidden_size", arch["hidden_size"]))
    ids = [int(i) - 1 for i in cfg["aux_hidden_state_layer_ids"]]
    n_target = int(cfg.get("num_target_layers", max(ids) + 1))
    verifier = (cfg.get("speculators_config") or {}).get("verifier") or {}
    target = {
        **layer,
        "num_hidden_layers": n_target,
        "hidden_size": target_hidden,
        "_name_or_path": verifier.get("name_or_path", ""),
        "architectures": verifier.get("architectures"),
    }
    return DrafterSpec(
        **arch,
        num_target_layers=n_target,
        target_hidden_size=target_hidden,
        target_layer_ids=ids,
        block_size=int(cfg["block_size"]),
        mask_token_id=int(cfg["mask_token_id"]),
        markov_rank=int(cfg.get("markov_rank", 0)),
        markov_head_type=cfg.get("markov_head_type", "vanilla"),
        enable_confidence_head=bool(cfg.get("enable_confidence_head", False)),
        confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", True)),
        # Absent in drafters saved before the greedy output: their one output is the sampling one.
        greedy_confidence=bool(cfg.get("greedy_confidence", False)),
        sts_temperatures=cfg.get("sts_temperatures"),
        sts_by_temperature=cfg.get("sts_by_temperature"),
        draft_vocab_size=draft_vocab_from(cfg, int(arch["vocab_size"])),
        target_config=target,
    )


# --------------------------------------------------------------------------- z-lab DFlash
def to_dflash(c: DrafterSpec, dtype: str) -> Dict[str, Any]:
    heads = [
        name
        for name, on in (
            (f"a Markov head (markov_rank={c.markov_rank})", c.markov_enabled),
            ("a confidence head", c.enable_confidence_head),
        )
        if on
    ]
    if heads:
        raise FormatError(
            f"the z-lab DFlash format cannot hold {' and '.join(heads)}: DFlashDraftModel is the plain parallel "
            "backbone, so these weights would be dropped and the drafter would propose different tokens. "
            "Export with export.format=speculators (or native), or train with model=dflash"
        )
    cfg = transformer_layer_config(c, dtype)
    cfg.update(
        architectures=["DFlashDraftModel"],
        dflash_config={
            "mask_token_id": c.mask_token_id,
            "target_layer_ids": list(c.target_layer_ids),
            "block_size": c.block_size,
        },
        num_target_layers=c.num_target_layers,
        # Not read by the z-lab runtime (which drafts from the MASK slots); kept so that every export
        # says which slot holds draft 1 and the checker can flag the mismatch.
        sample_from_anchor=SAMPLE_FROM_ANCHOR,
        torch_dtype=dtype,
    )
    return cfg


def from_dflash(cfg: Dict[str, Any], where: str = "config.json") -> DrafterSpec:
    _require(cfg, ("dflash_config", "num_target_layers"), where)
    dc = cfg["dflash_config"]
    _require(dc, ("mask_token_id", "target_layer_ids", "block_size"), f"{where}: dflash_config")
    arch = _arch_from_layer(cfg, where)
    target = {
        k: v for k, v in cfg.items() if k not in ("dflash_config", "architectures", "sample_from_anchor")
    }
    target["num_hidden_layers"] = int(cfg["num_target_layers"])
    return DrafterSpec(
        **arch,
        num_target_layers=int(cfg["num_target_layers"]),
        target_hidden_size=arch["hidden_size"],
        target_layer_ids=[int(i) for i in dc["target_layer_ids"]],
        block_size=int(dc["block_size"]),
        mask_token_id=int(dc["mask_token_id"]),
        markov_rank=0,
        enable_confidence_head=False,
        target_config=target,
    )


# --------------------------------------------------------------------------- registry
TO_CONFIG: Dict[str, Callable[[DrafterSpec, str], Dict[str, Any]]] = {
    "native": to_native,
    "speculators": to_speculators,
    "dflash": to_dflash,
}
FROM_CONFIG: Dict[str, Callable[..., DrafterSpec]] = {
    "native": from_native,
    "speculators": from_speculators,
    "dflash": from_dflash,
}


def format_config(c: DrafterSpec, fmt: str, dtype: str, include_sts: bool = True) -> Dict[str, Any]:
    check_choice("export.format", fmt, ExportFormat)
    if c.kind == "eagle3":
        raise FormatError(
            f"export.format={fmt}: the export formats carry DSpark/DFlash drafters; this one is "
            f"{c.kind} (a benchmark baseline, kept only in the run's native drafter/ folder)"
        )
    check_format_carries(c, fmt)
    if not include_sts:
        c = dataclasses.replace(c, sts_temperatures=None, sts_by_temperature=None)
    return TO_CONFIG[fmt](c, dtype)


def detect_format(cfg: Dict[str, Any], where: str = "config.json") -> str:
    if "speculators_model_type" in cfg:
        return "speculators"
    if "dflash_config" in cfg or "DFlashDraftModel" in (cfg.get("architectures") or []):
        return "dflash"
    if "target_layer_ids" in cfg and "num_target_layers" in cfg:
        return "native"
    raise ExportInputError(
        f"{where}: not a DSpark drafter config (none of 'speculators_model_type', 'dflash_config', "
        f"'target_layer_ids'+'num_target_layers'; architectures={cfg.get('architectures')})"
    )


def config_from_export(cfg: Dict[str, Any], where: str = "config.json") -> DrafterSpec:
    fmt = detect_format(cfg, where)
    try:
        return FROM_CONFIG[fmt](cfg, where)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ExportInputError):
            raise
        raise ExportInputError(f"{where}: invalid {fmt} drafter config: {e}") from None


def default_include_embeddings(fmt: str, requested: Optional[bool]) -> bool:
    if fmt == "dflash":
        if requested:
            raise FormatError(
                "export.include_embeddings=true is not possible for the z-lab DFlash format: "
                "it never carries embedding or lm_head tensors (the runtime shares the target's)"
            )
        return False
    return True if requested is None else bool(requested)
