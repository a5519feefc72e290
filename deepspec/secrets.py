"""Credentials never reach a file: every config copy deepspec writes (config.yaml, .hydra/*, checkpoint
configs, W&B, the dry-run printout) goes through :func:`redact` first.

A key counts as a credential when its last word names one (``token``, ``api_key``, ``secret``,
``password``, ``credentials``, ``*_key`` other than the data-column keys below); a string value counts
when it looks like a Hugging Face or OpenAI-style token, whatever its key. Only the fact that one was
set is kept: the value becomes ``<redacted>``; an unset one (None or "") stays as it was.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any, Iterable, List

REDACTED = "<redacted>"
_SECRET_WORD = re.compile(
    r"(^|[._-])(token|auth_?token|api_?key|access_?key|secret(_?key)?|private_?key|password|passwd|"
    r"credentials?|key)$",
    re.IGNORECASE,
)
# Keys ending in "key" that name a column of a data file, not a credential.
_NOT_SECRET = {"messages_key", "id_key", "prompt_key", "text_key", "sort_key"}
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,})\b")


def is_secret_key(key: Any) -> bool:
    k = str(key)
    return k.lower() not in _NOT_SECRET and bool(_SECRET_WORD.search(k))


def _scrub_text(value: str) -> str:
    return _SECRET_VALUE.sub(REDACTED, value)


def redact(obj: Any) -> Any:
    """A copy of a nested dict/list with credential values replaced by ``<redacted>``."""
    if isinstance(obj, dict):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _scrub_text(obj)
    if isinstance(obj, Enum):  # typed choices: written as their names, as OmegaConf writes them
        return obj.name
    return obj


def redact_overrides(overrides: Iterable[str]) -> List[str]:
    """Command-line overrides (``regen.api_key=sk-...``) with credential values replaced."""
    out = []
    for o in overrides:
        key, sep, value = str(o).partition("=")
        name = key.lstrip("+~").split(".")[-1].split("@")[0]
        if sep and is_secret_key(name) and value not in ("", "null"):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(_scrub_text(str(o)))
    return out


def config_dict(cfg) -> dict:
    """The resolved config as plain containers, credentials redacted."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return redact(cfg)


def config_yaml(cfg) -> str:
    """The resolved config as YAML, credentials redacted (what every config.yaml holds)."""
    import yaml

    return yaml.safe_dump(config_dict(cfg), sort_keys=False, allow_unicode=True)
