"""What an export may say about where things came from: Hub ids and names the user chose, never a
path of the machine that trained it (an export is meant to be published).

A local path becomes its last component (``/data/models/Qwen3-8B`` -> ``Qwen3-8B``); a Hub push whose
verifier is only known by such a name is refused, naming ``export.base_model`` as the key to set.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hub_id(name: Optional[str]) -> bool:
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def looks_local(value: str) -> bool:
    """An absolute, home-relative or dot-relative path, or a relative one that exists here."""
    v = value.strip()
    if not v or "://" in v:
        return False
    if v.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", v):
        return True
    return (os.sep in v or "/" in v) and not _HUB_ID.match(v) and Path(v).exists()


def public_name(value: Optional[str]) -> str:
    """A Hub id as it is; a local path as its last component ("" for nothing)."""
    if not value:
        return ""
    v = str(value)
    if not looks_local(v):
        return v
    parts = [p for p in re.split(r"[\\/]+", v.rstrip("/\\")) if p not in ("", ".", "..", "~")]
    return parts[-1] if parts else ""


def public_value(value: Any) -> Any:
    """``value`` (nested dicts/lists/strings) with every local path replaced by its public name;
    comma-separated lists (``data.path``) are handled part by part."""
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    if isinstance(value, str):
        if "," in value and not value.startswith("{"):
            return ",".join(public_name(p.strip()) for p in value.split(","))
        return public_name(value)
    return value


class LocalVerifierError(ValueError):
    """A Hub push would publish a drafter whose verifier is only a local folder."""


def require_hub_verifier(name: str, source: str) -> None:
    """Refuse a push whose verifier is not a Hub id (engines could not load it from the card/config)."""
    if is_hub_id(name):
        return
    raise LocalVerifierError(
        f"export.push_to_hub=true but the verifier is the local model {source!r}, which others cannot "
        "load and which would not be published; set export.base_model=<the target's Hub id> "
        "(e.g. export.base_model=Qwen/Qwen3-8B)"
    )
