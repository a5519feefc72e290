"""The one way a target model is found and loaded (training, collection, evaluation, regeneration).

``target.name_or_path`` is ``tiny`` (built on demand), a local model folder, or a Hugging Face Hub id.
Before transformers sees it, a local path is checked here, so a typo says "does not exist" rather than
transformers' "Repo id must be in the form ...", and a folder that is not a model says which files are
missing rather than a tokenizer-backend message. Weights are read from safetensors only
(``use_safetensors=True``): a ``pytorch_model.bin`` is a pickle, and unpickling runs code.
``trust_remote_code`` is passed through exactly as the user set it (off by default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

KEY = "target.name_or_path"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Hub ids: "name" or "namespace/name" of letters, digits, '-', '_', '.' (huggingface_hub's rule).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class TargetLoadError(ValueError):
    """The target named by ``target.name_or_path`` cannot be used; the message says why and what to do."""


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name and len(name) <= 96


def check_model_folder(folder: Path, name: str) -> None:
    """A local model folder holds config.json, tokenizer files and safetensors weights."""
    files = {p.name for p in folder.iterdir() if p.is_file()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files & set(TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            missing.append(
                f"*.safetensors weights (found only {', '.join(pickles)}: pickle files, which deepspec "
                "never loads because unpickling can run code; convert them to safetensors first)"
            )
        else:
            missing.append("*.safetensors weights")
    if missing:
        raise TargetLoadError(
            f"{KEY}={name!r}: {folder} is not a model folder; missing " + "; ".join(missing)
        )


def check_target_source(name: str) -> str:
    """The path or Hub id to hand to transformers, after checking what can be checked locally."""
    if not name:
        raise TargetLoadError(f"{KEY} is empty: set it to 'tiny', a local model folder or a Hub id")
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise TargetLoadError(
                f"{KEY}={name!r}: {p} is a file; expected a model folder (config.json, tokenizer files, "
                "*.safetensors) or a Hugging Face Hub id"
            )
        check_model_folder(p, name)
        return str(p)
    if looks_like_hub_id(name):
        return name
    raise TargetLoadError(
        f"{KEY}={name!r}: the path {p.absolute()} does not exist (and it is not a Hugging Face Hub id "
        "like 'Qwen/Qwen3-8B'); check the path"
    )


def resolve_target_path(cfg, accelerator=None) -> str:
    """``tiny`` -> the built tiny target's folder; anything else -> checked path or Hub id."""
    name = str(cfg.target.name_or_path)
    if name != "tiny":
        return check_target_source(name)
    from deepspec.target.tiny import build_tiny_target

    # Only the main process builds; the others wait and then find it in the cache.
    if accelerator is not None:
        with accelerator.main_process_first():
            return str(build_tiny_target(cfg.target.tiny))
    return str(build_tiny_target(cfg.target.tiny))


def _explain(path: str, what: str, err: Exception) -> TargetLoadError:
    where = "the local folder" if Path(path).is_dir() else "the Hub id (no local folder of that name)"
    hint = ""
    if "trust_remote_code" in str(err):
        hint = "; set target.trust_remote_code=true only if you trust the code in that repository"
    return TargetLoadError(f"{KEY}={path!r}: could not load the {what} from {where}: {err}{hint}")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
    except (OSError, ValueError) as e:
        raise _explain(path, "tokenizer", e) from e


def load_config(path: str, trust_remote_code: bool = False) -> Dict[str, Any]:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=bool(trust_remote_code)).to_dict()
    except (OSError, ValueError) as e:
        raise _explain(path, "config", e) from e


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """The HF model, weights from safetensors only (a repo with only .bin weights is refused)."""
    from transformers import AutoModelForCausalLM

    from deepspec.target.adapter import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"target.dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=bool(trust_remote_code), use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise _explain(path, "weights (safetensors only)", e) from e


@dataclass
class TargetInfo:
    """What every stage needs before the target's weights load: where it is, its tokenizer, its config."""

    path: str
    tokenizer: Any
    config: Dict[str, Any]
    trust_remote_code: bool


def open_target(cfg, accelerator: Optional[Any] = None) -> TargetInfo:
    path = resolve_target_path(cfg, accelerator)
    trc = bool(cfg.target.trust_remote_code)
    return TargetInfo(path, load_tokenizer(path, trc), load_config(path, trc), trc)
