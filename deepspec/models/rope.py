"""The drafter's rotary position embedding: exactly the target's, for every RoPE type it may use.

A drafter reads the target's features at the target's positions and is served by engines that
build its rotary table from the exported config, so its cos/sin must be the target's own. The
frequencies therefore come from transformers' own ``ROPE_INIT_FUNCTIONS`` fed with the target's
``rope_parameters`` (``rope_scaling`` in older configs), head dim and context length, and cos/sin
are formed the way transformers' rotary modules form them (angles in fp32, times the type's
attention scaling, then cast).

Types whose tables depend on the sequence length (``dynamic``, ``longrope``) are computed as the
target computes them for one forward whose largest position is the largest position asked for:
inside the original context that is the static table.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
# Types whose table changes once the sequence outgrows the original context.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def rope_parameters_of(cfg: Dict[str, Any], layer_type: Optional[str] = None) -> Dict[str, Any]:
    """The flat RoPE description (``rope_type``, ``rope_theta``, scaling keys) of an HF config dict.

    Reads ``rope_parameters`` (transformers 5), else the legacy ``rope_scaling`` + ``rope_theta``.
    Per-layer-type configs (Gemma 4: ``{"full_attention": {...}, "sliding_attention": {...}}``)
    need ``layer_type``.
    """
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        if layer_type not in rp:
            raise ValueError(
                f"rope_parameters is given per layer type {sorted(rp)}; the drafter needs "
                f"{layer_type!r}, which is missing"
            )
        rp = rp[layer_type]
    out: Dict[str, Any] = dict(rp) if isinstance(rp, dict) else {}
    legacy = cfg.get("rope_scaling")
    if not out and isinstance(legacy, dict):
        out = dict(legacy)
    if "type" in out and "rope_type" not in out:  # the oldest spelling
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    if out.get("rope_theta") is None:
        out["rope_theta"] = float(cfg.get("rope_theta") or 10000.0)
    return out


def check_rope(rope: Dict[str, Any], field: str = "rope_parameters") -> None:
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise ValueError(f"target {field}.rope_type={kind!r} is not supported; expected one of {ROPE_TYPES}")
    prf = float(rope.get("partial_rotary_factor", 1.0))
    if kind != "proportional" and prf != 1.0:
        raise ValueError(
            f"target {field}.partial_rotary_factor={prf}: the drafter rotates the whole head "
            f"(partial_rotary_factor 1.0) except with rope_type 'proportional'"
        )


class RotaryEmbedding:
    """cos/sin tables for integer positions, identical to the target's rotary module.

    ``rope``: the flat description from :func:`rope_parameters_of`; ``head_dim``: the rotated head
    size; ``max_position_embeddings``: the target's (the dynamic/yarn/longrope types read it).
    """

    def __init__(self, rope: Dict[str, Any], head_dim: int, max_position_embeddings: int) -> None:
        check_rope(rope)
        self.rope = dict(rope)
        self.kind = self.rope["rope_type"]
        self.head_dim = int(head_dim)
        self.max_positions = int(max_position_embeddings)
        self._tables: Dict[Optional[int], Tuple[torch.Tensor, float]] = {}
        self.inv_freq, self.scaling = self._init(None)

    def _hf_config(self):
        from transformers import LlamaConfig

        # Any family's config works as a carrier: the init functions read only these fields.
        return LlamaConfig(
            hidden_size=self.head_dim,
            num_attention_heads=1,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_positions,
            rope_parameters=dict(self.rope),
        )

    def _init(self, seq_len: Optional[int]) -> Tuple[torch.Tensor, float]:
        if seq_len in self._tables:
            return self._tables[seq_len]
        if self.kind == "default":
            theta = float(self.rope["rope_theta"])
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            table = (1.0 / theta**exps, 1.0)
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv, scaling = ROPE_INIT_FUNCTIONS[self.kind](self._hf_config(), None, seq_len=seq_len)
            table = (inv.float(), float(scaling))
        self._tables[seq_len] = table
        return table

    def frequencies(self, positions: torch.Tensor) -> Tuple[torch.Tensor, float]:
        inv, scaling = self.inv_freq, self.scaling
        if self.kind in _LENGTH_DEPENDENT and positions.numel():
            seq_len = int(positions.max()) + 1
            if self.kind == "longrope":  # one long table for every length past the original context
                original = int(self.rope.get("original_max_position_embeddings", self.max_positions))
                if seq_len > original:
                    inv = self._init(original + 1)[0]
            elif seq_len > self.max_positions:
                inv = self._init(seq_len)[0]  # the scaling stays the one chosen at init, as in transformers
        return inv, scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions: integer tensor of any shape -> (cos, sin), each [..., head_dim] in ``dtype``."""
        inv, scaling = self.frequencies(positions)
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
