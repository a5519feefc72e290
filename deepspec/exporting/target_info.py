"""What the checker needs to know about a target: its HF config, and optionally its embedding and lm_head.

Only those two tensors are read (through the safetensors header), never the whole model, so checking
an export against a large local target stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from safetensors import safe_open

from deepspec.exporting.io import ExportInputError, read_json


@dataclass
class TargetInfo:
    config: Dict[str, Any]
    embed: Optional[torch.Tensor] = None
    lm_head: Optional[torch.Tensor] = None
    where: str = "target"

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])


def _text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    # Multimodal configs (e.g. Gemma) nest the language model's config.
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        return dict(cfg["text_config"])
    return cfg


def _weight_files(p: Path):
    index = p / "model.safetensors.index.json"
    if index.is_file():
        return sorted({p / f for f in read_json(index).get("weight_map", {}).values()})
    return sorted(p.glob("*.safetensors"))


def read_target(path: Union[str, Path], load_head: bool = True) -> TargetInfo:
    """Target config (and, if its weights are local, its embedding and lm_head) from an HF folder."""
    p = Path(path)
    if not p.is_dir():
        raise ExportInputError(
            f"--target {p}: not a local folder (the checker reads the target's config.json"
            " and, if present, its safetensors weights; it never downloads)"
        )
    cfg = _text_config(read_json(p / "config.json"))
    info = TargetInfo(cfg, where=str(p / "config.json"))
    if not load_head:
        return info
    found: Dict[str, torch.Tensor] = {}
    for f in _weight_files(p):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    for short in ("embed_tokens.weight", "lm_head.weight"):
                        if name.endswith(short) and short not in found and "mtp" not in name:
                            found[short] = st.get_tensor(name).float()
        except Exception as e:
            raise ExportInputError(f"{f}: not a readable safetensors file ({e})") from None
    info.embed = found.get("embed_tokens.weight")
    info.lm_head = found.get("lm_head.weight")
    if info.lm_head is None and info.embed is not None and cfg.get("tie_word_embeddings", False):
        info.lm_head = info.embed
    return info


def as_target(target: Any) -> Optional[TargetInfo]:
    if target is None or isinstance(target, TargetInfo):
        return target
    if isinstance(target, dict):
        return TargetInfo(_text_config(target), where="target config")
    return read_target(target)
