"""Check an exported drafter before an engine serves it at near-zero acceptance without complaint.

Each check names the key or tensor at fault and what was expected. The layer-id truth comes from
``deepspec_export.json`` (written with the export) or from a reference drafter; the logits truth
from the reference or from the probe in that same file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from deepspec.exporting.check_logits import check_logits
from deepspec.exporting.formats import EMBED_KEYS, SAMPLE_FROM_ANCHOR, config_from_export, detect_format
from deepspec.exporting.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExportInputError,
    read_json,
    weights_header,
)
from deepspec.exporting.target_info import TargetInfo, as_target
from deepspec.exporting.writer import SIDECAR_NAME, load_export
from deepspec.models import Drafter, build_drafter

_ST_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}
REQUIRED = {
    "native": (
        "architectures",
        "num_hidden_layers",
        "num_target_layers",
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "confidence_head_with_markov",
        "tie_word_embeddings",
        "vocab_size",
        "hidden_size",
    ),
    "speculators": (
        "speculators_model_type",
        "transformer_layer_config",
        "speculators_config",
        "aux_hidden_state_layer_ids",
        "mask_token_id",
        "block_size",
        "target_hidden_size",
        "draft_vocab_size",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "confidence_head_with_markov",
        "sample_from_anchor",
    ),
    "dflash": ("architectures", "dflash_config", "num_target_layers"),
}
_IDS_KEY = {
    "native": "target_layer_ids",
    "speculators": "aux_hidden_state_layer_ids",
    "dflash": "dflash_config.target_layer_ids",
}
_ID_OFFSET = {"native": 0, "speculators": 1, "dflash": 0}


class ExportCheckError(ValueError):
    """The export failed the checker; the message lists every problem found."""


@dataclass
class CheckReport:
    path: Path  # the folder as named in messages
    root: Path  # the folder actually read (differs while an export is still staged)
    format: str = "?"
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    passed: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def render(self) -> str:
        lines = [f"check {self.path} (format: {self.format}): {'OK' if self.ok else 'FAILED'}"]
        lines += [f"  ok    {m}" for m in self.passed]
        lines += [f"  WARN  {m}" for m in self.warnings]
        lines += [f"  ERROR {m}" for m in self.errors]
        return "\n".join(lines)

    def raise_if_failed(self) -> CheckReport:
        if not self.ok:
            raise ExportCheckError(self.render())
        return self


def check_export(
    path: Union[str, Path],
    target: Any = None,
    reference: Union[None, str, Path, Drafter] = None,
    display_path: Union[None, str, Path] = None,
) -> CheckReport:
    """Check ``path`` (any of the three formats), optionally against a target and a reference drafter."""
    p = Path(path)
    rep = CheckReport(Path(display_path or p), p)
    try:
        raw = read_json(p / CONFIG_NAME)
        rep.format = detect_format(raw, str(rep.path / CONFIG_NAME))
    except ExportInputError as e:
        rep.errors.append(str(e).replace(str(p), str(rep.path)))
        return rep
    sidecar = read_json(p / SIDECAR_NAME) if (p / SIDECAR_NAME).is_file() else None
    if sidecar is None:
        rep.warnings.append(
            f"{SIDECAR_NAME} not found: layer ids and logits can only be checked against a reference"
        )
    if isinstance(reference, (str, Path)):
        reference = load_export(reference)
    tgt = as_target(target)

    _check_keys(rep, raw)
    _check_layer_ids(rep, raw, sidecar, reference, tgt)
    if rep.errors:
        return rep  # the rest needs a parseable config
    try:
        c = config_from_export(raw, str(rep.path / CONFIG_NAME))
    except (ExportInputError, ValueError) as e:
        rep.errors.append(str(e))
        return rep
    _check_target(rep, raw, c, tgt)
    _check_tensors(rep, raw, c, sidecar)
    if not rep.errors:
        check_logits(rep, c, sidecar, reference, tgt)
    return rep


def _check_keys(rep: CheckReport, raw: Dict[str, Any]) -> None:
    fmt, where = rep.format, rep.path / CONFIG_NAME
    missing = [k for k in REQUIRED[fmt] if k not in raw]
    if "sample_from_anchor" in missing:
        missing.remove("sample_from_anchor")
        rep.errors.append(
            f"{where}: missing key 'sample_from_anchor' (expected {str(SAMPLE_FROM_ANCHOR).lower()}): without it "
            "vLLM falls back to drafting from the first MASK slot, and this drafter, whose anchor slot holds draft 1, "
            "is served at <1% acceptance with no error"
        )
    elif "sample_from_anchor" in raw and raw["sample_from_anchor"] is not SAMPLE_FROM_ANCHOR:
        rep.errors.append(
            f"{where}: sample_from_anchor={raw['sample_from_anchor']!r}, expected "
            f"{SAMPLE_FROM_ANCHOR} (the anchor position is this drafter's first prediction slot)"
        )
    if missing:
        rep.errors.append(f"{where}: missing required keys {missing} for the {fmt} format")
    if fmt == "speculators" and "speculators_config" in raw:
        sc = raw["speculators_config"]
        for k in ("algorithm", "proposal_methods", "default_proposal_method", "verifier"):
            if k not in sc:
                rep.errors.append(f"{where}: speculators_config is missing '{k}'")
        methods = sc.get("proposal_methods") or [{}]
        if methods[0].get("speculative_tokens") != raw.get("block_size"):
            rep.errors.append(
                f"{where}: proposal_methods[0].speculative_tokens={methods[0].get('speculative_tokens')} "
                f"but block_size={raw.get('block_size')} (the drafter proposes block_size tokens)"
            )
        ver = sc.get("verifier") or {}
        if not ver.get("name_or_path"):
            rep.warnings.append(
                f"{where}: speculators_config.verifier.name_or_path is empty; set export.base_model"
            )
    if fmt == "dflash":
        if raw.get("architectures") != ["DFlashDraftModel"]:
            rep.errors.append(
                f"{where}: architectures={raw.get('architectures')}, expected ['DFlashDraftModel']"
            )
        # A structural fact worth repeating: the z-lab runtime drafts from the MASK slots.
        rep.warnings.append(
            "z-lab DFlash runtimes draft from the MASK slots (the anchor's output is discarded); "
            "this drafter predicts draft 1 at the anchor slot (sample_from_anchor=true), so serve "
            "it with an engine that honours sample_from_anchor"
        )
    if not rep.errors:
        rep.passed.append(f"required {fmt} keys present")


def _ids_of(raw: Dict[str, Any], fmt: str):
    if fmt == "dflash":
        return (raw.get("dflash_config") or {}).get("target_layer_ids")
    return raw.get(_IDS_KEY[fmt])


def _check_layer_ids(rep, raw, sidecar, reference, tgt: Optional[TargetInfo]) -> None:
    fmt, where = rep.format, rep.path / CONFIG_NAME
    ids, key, off = _ids_of(raw, fmt), _IDS_KEY[fmt], _ID_OFFSET[fmt]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        rep.errors.append(f"{where}: {key}={ids!r}, expected a non-empty list of ints")
        return
    native = [i - off for i in ids]
    truth, source = None, None
    if reference is not None:
        truth, source = list(reference.config.target_layer_ids), "the reference drafter"
    elif sidecar is not None and "target_layer_ids" in sidecar:
        truth, source = list(sidecar["target_layer_ids"]), SIDECAR_NAME
    before = len(rep.errors)
    if truth is not None and native != truth:
        want = [i + off for i in truth]
        rule = "native target_layer_ids + 1" if off else "the native target_layer_ids (no offset)"
        shifted = len(truth) == len(native) and any(
            all(a - b == s for a, b in zip(native, truth)) for s in (1, -1)
        )
        rep.errors.append(
            f"{where}: {key}={ids} but the drafter was trained on native target_layer_ids {truth} (from {source}); "
            f"this format expects {rule} = {want}"
            + (
                ": the layer ids are shifted by one (native ids vs HF hidden_states indices)"
                if shifted
                else ""
            )
        )
    n = raw.get("num_target_layers") or (sidecar or {}).get("num_target_layers")
    if n is None and tgt is not None:
        n = tgt.num_layers
    if n is not None:
        bad = [i for i in native if not -1 <= i < int(n)]
        if bad:
            rep.errors.append(
                f"{where}: {key}={ids} out of range for a {n}-layer target "
                f"(valid: {[-1 + off, int(n) - 1 + off]})"
            )
    if any(b <= a for a, b in zip(ids, ids[1:])):
        rep.errors.append(f"{where}: {key}={ids} must be strictly increasing")
    if tgt is not None and n is not None and int(n) != tgt.num_layers:
        rep.errors.append(
            f"{where}: num_target_layers={n} but the target ({tgt.where}) has {tgt.num_layers} layers"
        )
    if fmt == "speculators" and truth is None and 0 in ids:
        rep.warnings.append(
            f"{where}: {key} contains 0 (the embedding output); check the native+1 convention"
        )
    if len(rep.errors) == before:
        rep.passed.append(f"layer ids {key}={ids} (native {native})" + (f" match {source}" if source else ""))


def _check_target(rep, raw, c, tgt: Optional[TargetInfo]) -> None:
    if tgt is None:
        rep.warnings.append(
            "no target given: vocab and hidden size not checked against the target (pass --target)"
        )
        return
    where = rep.path / CONFIG_NAME
    vocab_keys = {"vocab_size": c.vocab_size}
    if rep.format == "speculators":
        vocab_keys["draft_vocab_size"] = raw.get("draft_vocab_size")
    before = len(rep.errors)
    for k, v in vocab_keys.items():
        if k == "draft_vocab_size" and c.pruned and v == c.draft_vocab_size < tgt.vocab_size:
            continue  # a draft vocabulary: its d2t/t2d maps are checked with the tensors
        if v != tgt.vocab_size:
            rep.errors.append(
                f"{where}: vocab mismatch with the target: {k}={v} but the target ({tgt.where}) has "
                f"vocab_size={tgt.vocab_size}; the drafter was trained for another tokenizer/target"
            )
    if not 0 <= c.mask_token_id < tgt.vocab_size:
        rep.errors.append(
            f"{where}: mask_token_id={c.mask_token_id} is outside the target vocab [0, {tgt.vocab_size})"
        )
    if c.target_hidden_size != tgt.hidden_size:
        rep.errors.append(
            f"{where}: target_hidden_size={c.target_hidden_size} but the target has "
            f"hidden_size={tgt.hidden_size}"
        )
    _check_rope(rep, c, tgt)
    if rep.format == "speculators":
        archs = ((raw.get("speculators_config") or {}).get("verifier") or {}).get("architectures")
        if tgt.config.get("architectures") and archs != tgt.config.get("architectures"):
            rep.warnings.append(
                f"{where}: verifier.architectures={archs} but the target declares "
                f"{tgt.config.get('architectures')}"
            )
    if len(rep.errors) == before:
        rep.passed.append(
            f"vocab {c.vocab_size}, hidden {c.target_hidden_size}, mask {c.mask_token_id} fit the target"
        )


def _check_rope(rep, c, tgt: TargetInfo) -> None:
    """The export's RoPE must be the target's (scaling included): an engine builds the drafter's rotary
    table from the export, and positions then have to mean what they mean to the target."""
    from deepspec.models.families import family_for_target, text_config

    t = text_config(tgt.config)
    try:
        want = family_for_target(str(t.get("model_type") or "qwen3")).arch(t)["rope_parameters"]
    except (KeyError, ValueError):
        return  # not a family we can read the target of; the family check reports it elsewhere

    def clean(d):
        return {k: v for k, v in d.items() if v is not None}

    if clean(want) != clean(c.rope):
        rep.errors.append(
            f"{rep.path / CONFIG_NAME}: rope_parameters {c.rope} differ from the target's {want} "
            f"({tgt.where}): the drafter's positions would not be the target's"
        )


def _check_tensors(rep, raw, c, sidecar) -> None:
    wpath = rep.path / WEIGHTS_NAME
    try:
        header = weights_header(rep.root)
    except ExportInputError as e:
        rep.errors.append(str(e).replace(str(rep.root), str(rep.path)))
        return
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_drafter(c).state_dict().items()}
    has_embed = [k for k in EMBED_KEYS if k in header]
    if rep.format == "dflash":
        for k in has_embed:
            rep.errors.append(
                f"{wpath}: tensor '{k}' must not be in a z-lab DFlash export (shared from the target)"
            )
        for k in (k for k in header if k.startswith(("markov_head.", "confidence_head."))):
            rep.errors.append(
                f"{wpath}: tensor '{k}' belongs to a Markov/confidence head, which the z-lab "
                "DFlash format cannot hold"
            )
    omitted = EMBED_KEYS[0] not in header and not (sidecar or {}).get("embeddings_included", False)
    if omitted:
        # A pruned drafter's lm_head (its draft vocabulary's rows) is always written.
        dropped = EMBED_KEYS[:1] if c.pruned else EMBED_KEYS
        expected = {k: v for k, v in expected.items() if k not in dropped}
    before = len(rep.errors)
    for k, shape in expected.items():
        if k not in header:
            rep.errors.append(f"{wpath}: missing tensor '{k}' (expected shape {list(shape)})")
        elif header[k][0] != shape:
            rep.errors.append(
                f"{wpath}: tensor '{k}' has shape {list(header[k][0])}, expected {list(shape)} "
                f"(from {CONFIG_NAME})"
            )
    for k in sorted(set(header) - set(expected)):
        if not (
            rep.format == "dflash" and (k in EMBED_KEYS or k.startswith(("markov_head.", "confidence_head.")))
        ):
            rep.errors.append(f"{wpath}: unexpected tensor '{k}' (not part of a drafter with this config)")
    declared = raw.get("torch_dtype") or raw.get("dtype")
    if declared is None:
        rep.warnings.append(f"{rep.path / CONFIG_NAME}: no torch_dtype/dtype declared")
    # The draft vocabulary's maps keep their own dtypes (engines read d2t as int64 offsets).
    own = {"d2t": "I64", "t2d": "BOOL"} if c.pruned else {}
    wrong = sorted(
        {
            f"{k}: {_ST_DTYPES.get(d, d)}"
            for k, (_, d) in header.items()
            if (own[k] != d if k in own else _ST_DTYPES.get(d, d) != declared)
        }
    )
    if declared is not None and wrong:
        rep.errors.append(
            f"{wpath}: tensors not in the declared dtype {declared}: {wrong[:5]}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    if len(rep.errors) == before:
        rep.passed.append(
            f"{len(header)} tensors, names/shapes/dtype ({declared}) match"
            + (" (embedding/lm_head omitted: shared from the target)" if omitted else "")
        )
