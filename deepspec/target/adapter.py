"""A frozen HF causal LM seen through what a drafter needs from it.

Layer outputs are captured with forward hooks on the decoder layers, not read from
``output_hidden_states``: HF replaces the last entry of that tuple with the *normed* state, so
hooks are the only way to get raw outputs for every id. The final-norm hidden is captured on the
model's final norm.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TargetOutput:
    aux: torch.Tensor  # [B, L, n·H] selected layer outputs, concatenated on the feature axis
    final: torch.Tensor  # [B, L, H] final-norm hidden state (lm_head input)
    logits: Optional[torch.Tensor] = None  # [B, L, V] when asked for
    past_key_values: Optional[object] = None


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        # Multimodal wrappers (e.g. Gemma 3/4) keep the LM one level deeper.
        base = getattr(base, "language_model", base)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(
            f"{type(model).__name__}: cannot find decoder layers and final norm (expected model.model.layers "
            "and model.model.norm as in Llama/Qwen/Gemma)"
        )
    return base


class TargetModel:
    """Frozen target: eval mode, no grads, hooks for the selected layers."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int]) -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decoder = _decoder(model)
        self.num_layers = len(self.decoder.layers)
        from deepspec.models.config import check_layer_ids

        check_layer_ids(list(layer_ids), self.num_layers)
        self.layer_ids: List[int] = list(layer_ids)
        self.sharded = False  # target.shard=fsdp (deepspec/target/sharding.py)
        self._captured: dict = {}
        self._hooks = []
        for i in self.layer_ids:
            mod = self.decoder.embed_tokens if i == -1 else self.decoder.layers[i]
            self._hooks.append(mod.register_forward_hook(self._capture(i)))
        self._hooks.append(self.decoder.norm.register_forward_hook(self._capture("final")))
        # transformers renamed `past_key_values` to `cache` (5.x); pass whichever forward takes.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        layer_ids: Sequence[int],
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
    ) -> TargetModel:
        from deepspec.target.loading import load_causal_lm

        return cls(load_causal_lm(path, dtype, trust_remote_code).to(device), layer_ids)

    def _capture(self, key):
        def hook(_mod, _inp, out):
            self._captured[key] = out[0] if isinstance(out, (tuple, list)) else out

        return hook

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_tokens(self) -> nn.Embedding:
        """The input embedding; when sharded, a view whose ``.weight`` all-gathers (on every rank)."""
        from deepspec.target.sharding import gathered

        return gathered(self.model.get_input_embeddings(), self.sharded)

    @property
    def lm_head(self) -> nn.Linear:
        """The output layer; when sharded, a view whose ``.weight`` and calls all-gather (on every rank)."""
        from deepspec.target.sharding import gathered

        return gathered(self.model.get_output_embeddings(), self.sharded)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]  # a DTensor's shape is the global one

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        past_key_values=None,
        with_logits: bool = False,
        use_cache: bool = False,
        position_ids: Optional[torch.Tensor] = None,
    ) -> TargetOutput:
        self._captured.clear()
        kwargs = {}
        if past_key_values is not None:
            kwargs[self._cache_arg] = past_key_values
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            position_ids=position_ids,
            logits_to_keep=0 if with_logits else 1,
            **kwargs,
        )
        missing = [i for i in self.layer_ids if i not in self._captured]
        if missing or "final" not in self._captured:
            raise RuntimeError(f"target forward did not run layers {missing} (hooks not triggered)")
        aux = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1)
        final = self._captured["final"]
        self._captured.clear()
        return TargetOutput(
            aux=aux,
            final=final,
            logits=out.logits if with_logits else None,
            past_key_values=(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
            if use_cache
            else None,
        )

    __call__ = forward
