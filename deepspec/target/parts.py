"""The few pieces of a target that a vLLM-fed collection needs in deepspec's own process.

With ``collect.backend=vllm`` the target may be too large for one device, so its decoder layers
never load here. What the cache still needs from deepspec's side: the config (hash, sizes), the
embedding and lm_head rows for the weight fingerprint, and the final norm (the cache's ``final`` is
the final-norm hidden; vLLM hands back the last layer's raw output). The model is built on the meta
device with the family's own HF classes, and only those modules are filled from the safetensors
files, so the norm is the family's exact code (Gemma's ``1 + w`` included) at a few MB of memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from deepspec.target.loading import TargetLoadError


def _weight_files(path: str, names: List[str]) -> Dict[str, str]:
    """tensor name -> local safetensors file, for the tensors of ``names`` that exist."""
    folder = Path(path)
    index_name = "model.safetensors.index.json"
    if not folder.is_dir():  # a Hub id: fetch only the index and the files holding these tensors
        from huggingface_hub import hf_hub_download

        try:
            index = json.loads(Path(hf_hub_download(path, index_name)).read_text())["weight_map"]
            files = {n: index[n] for n in names if n in index}
        except Exception:  # one-file checkpoints have no index
            files = {n: "model.safetensors" for n in names}
        return {n: hf_hub_download(path, f) for n, f in files.items()}
    if (folder / index_name).is_file():
        index = json.loads((folder / index_name).read_text())["weight_map"]
        return {n: str(folder / index[n]) for n in names if n in index}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TargetLoadError(f"target.name_or_path={path!r}: no *.safetensors weights in {folder}")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update({n: str(f) for n in names if n in h.keys()})
    return out


class TargetParts:
    """Config, embedding, lm_head and final norm of a target, without its decoder layers."""

    def __init__(self, path: str, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        from deepspec.target.adapter import DTYPES, _decoder

        config = AutoConfig.from_pretrained(path, trust_remote_code=bool(trust_remote_code))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], trust_remote_code=bool(trust_remote_code)
            )
        decoder = _decoder(model)
        self.config = model.config
        self.num_layers = len(decoder.layers)
        names = {id(m): n for n, m in model.named_modules()}
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        modules = {"embed": embed, "lm_head": head, "norm": decoder.norm}
        wanted = {
            f"{names[id(m)]}.{p}": (key, p) for key, m in modules.items() for p, _ in m.named_parameters()
        }
        files = _weight_files(path, list(wanted))
        tied = head.weight is embed.weight or bool(getattr(config, "tie_word_embeddings", False))
        loaded: Dict[str, Dict[str, torch.Tensor]] = {k: {} for k in modules}
        for name, (key, p) in wanted.items():
            if name not in files:
                continue
            with safe_open(files[name], framework="pt") as h:
                loaded[key][p] = h.get_tensor(name).to(DTYPES[dtype])
        if not loaded["lm_head"] and tied:
            loaded["lm_head"] = dict(loaded["embed"])
        for key, m in modules.items():
            missing = [p for p, _ in m.named_parameters() if p not in loaded[key]]
            if missing:
                raise TargetLoadError(
                    f"target.name_or_path={path!r}: the safetensors weights have no {names[id(m)]}."
                    f"{missing[0]} (looked up under the model's own module names)"
                )
        self.norm: nn.Module = decoder.norm.to_empty(device="cpu")
        self.norm.load_state_dict(loaded["norm"], strict=False)
        self.norm.eval()
        self._embed_weight = loaded["embed"]["weight"]
        self._lm_head_weight = loaded["lm_head"]["weight"]
        self.dtype = DTYPES[dtype]

    @property
    def hidden_size(self) -> int:
        return int(self._embed_weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self._lm_head_weight.shape[0])

    @property
    def embed_weight(self) -> torch.Tensor:
        return self._embed_weight

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self._lm_head_weight

    @torch.no_grad()
    def final_norm(self, last_layer_output: torch.Tensor) -> torch.Tensor:
        """The target's final norm of its last layer's raw output: the cache's ``final`` feature."""
        return self.norm(last_layer_output.to(self.dtype))
