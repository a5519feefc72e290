"""Find and load what an evaluation needs: the drafter folder, the target, and check they fit.

Every check that can run from config files runs before any weights are loaded, so a drafter built
for another target fails in a second with the offending key, not after minutes of decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from deepspec.models.config import DrafterSpec


def resolve_drafter_dir(path: str) -> Tuple[Path, bool]:
    """(native drafter folder, whether ``path`` was a training output dir holding ``drafter/``)."""
    if not path:
        raise ValueError("eval.drafter is not set: give a native drafter folder or a training output dir")
    p = Path(path)
    if (p / "config.json").is_file():
        return p, False
    if (p / "drafter" / "config.json").is_file():
        return p / "drafter", True
    raise FileNotFoundError(
        f"eval.drafter={path}: neither {p / 'config.json'} nor {p / 'drafter' / 'config.json'} exists "
        "(expected a native drafter folder or a training output dir)"
    )


def _text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        return dict(cfg["text_config"])
    return cfg


def check_against_target_config(
    dc: DrafterSpec, target_config: Dict[str, Any], tokenizer=None, target_name: str = "target"
) -> None:
    """The drafter's facts against the target's HF config (and tokenizer), before loading weights."""
    t = _text_config(dict(target_config))
    problems = []
    if int(t["vocab_size"]) != dc.vocab_size:
        problems.append(f"vocab_size: drafter {dc.vocab_size}, target {t['vocab_size']}")
    if int(t["hidden_size"]) != dc.target_hidden_size:
        problems.append(
            f"hidden size: drafter reads features of size {dc.target_hidden_size}, target has {t['hidden_size']}"
        )
    n = int(t["num_hidden_layers"])
    if n != dc.num_target_layers:
        problems.append(
            f"num_target_layers: drafter was built for {dc.num_target_layers} layers, target has {n}"
        )
    bad = [i for i in dc.target_layer_ids if not -1 <= i < n]
    if bad:
        problems.append(
            f"target_layer_ids {list(dc.target_layer_ids)}: {bad} out of range for a {n}-layer target"
        )
    vocab = int(t["vocab_size"])
    if not 0 <= dc.mask_token_id < vocab:
        problems.append(
            f"mask_token_id {dc.mask_token_id} is outside the target's embedding [0, {vocab - 1}]"
        )
    elif tokenizer is not None:
        tok_mask = getattr(tokenizer, "mask_token_id", None)
        special = set(getattr(tokenizer, "all_special_ids", []))
        if tok_mask is not None and tok_mask != dc.mask_token_id:
            problems.append(
                f"mask_token_id: drafter uses {dc.mask_token_id}, the target's tokenizer mask token is {tok_mask}"
            )
        elif tok_mask is None and dc.mask_token_id < len(tokenizer) and dc.mask_token_id not in special:
            problems.append(
                f"mask_token_id {dc.mask_token_id} is an ordinary token of the target's tokenizer "
                f"({tokenizer.convert_ids_to_tokens(dc.mask_token_id)!r}); the drafter was built for another tokenizer"
            )
    if problems:
        raise ValueError(f"drafter does not match {target_name}: " + "; ".join(problems))


def check_inputs(cfg) -> Dict[str, Any]:
    """Resolve the drafter folder and the target, and check they fit, from config files only.

    Returns {drafter_dir, from_run_dir, drafter_config, target_path, tokenizer}.
    """
    from deepspec.exporting.io import read_json
    from deepspec.exporting.native import config_from_native
    from deepspec.target.loading import open_target

    drafter_dir, from_run = resolve_drafter_dir(cfg.eval.drafter)
    dc = config_from_native(read_json(drafter_dir / "config.json"))
    info = open_target(cfg)
    path, tokenizer, target_config = info.path, info.tokenizer, info.config
    check_against_target_config(dc, target_config, tokenizer, target_name=f"target {path}")
    return {
        "drafter_dir": drafter_dir,
        "from_run_dir": from_run,
        "drafter_config": dc,
        "target_path": path,
        "tokenizer": tokenizer,
    }


def load_models(cfg, inputs: Dict[str, Any], device) -> Tuple[Any, Any]:
    """(target, drafter) for the inputs :func:`check_inputs` accepted."""
    import torch

    from deepspec.exporting.native import load_native
    from deepspec.target.adapter import DTYPES, TargetModel

    dc = inputs["drafter_config"]
    target = TargetModel.from_pretrained(
        inputs["target_path"], dc.target_layer_ids, cfg.target.dtype, device, cfg.target.trust_remote_code
    )
    drafter = load_native(
        inputs["drafter_dir"], device=device, dtype=DTYPES.get(cfg.target.dtype, torch.float32)
    )
    return target, drafter
