"""Gemma 4 (text) drafter layers with KV injection, following the target's Gemma 4 text config.

What differs from the Qwen3/Llama layer (deepspec/models/layers.py), as Gemma 4 computes it:
queries, keys *and values* are RMS-normalised per head (values without a learned scale); scores
are not divided by sqrt(head_dim) (scale 1); with ``attention_k_eq_v`` there is no ``v_proj`` and
the values are the key projection (before the key norm); the layer has four norms (before and
after attention, before and after the MLP) and ends by multiplying with ``layer_scalar`` (a
buffer, 1 in a drafter). Drafter layers are full-attention layers: they use the target's global
head dim and full-attention RoPE. Tensor names are those of DeepSpec's Gemma4DSparkModel.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from deepspec.models.attention import attend
from deepspec.models.layers import MLP, apply_rope


class Gemma4RMSNorm(nn.Module):
    """x / rms(x), times ``weight`` when ``with_scale``; computed in fp32, then cast back (as Gemma 4)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


class Gemma4Attention(nn.Module):
    def __init__(self, c) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.attn_impl = c.attn_impl
        self.scale = c.attn_scale
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = (
            None if c.attention_k_eq_v else nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=bias)
        )
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=bias)
        self.q_norm = Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(self.head_dim, c.rms_norm_eps, with_scale=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys/values of ``x`` [B, T, H] at the positions of ``cos``/``sin``: [B, kv_heads, T, D]."""
        k_raw = self._heads(self.k_proj(x), self.n_kv)
        v_raw = k_raw if self.v_proj is None else self._heads(self.v_proj(x), self.n_kv)
        return apply_rope(self.k_norm(k_raw), cos, sin), self.v_norm(v_raw)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        q = apply_rope(self.q_norm(self._heads(self.q_proj(x), self.n_heads)), cos, sin)
        k_blk, v_blk = self.project_kv(x, cos, sin)
        k = torch.cat([ctx_k, k_blk], dim=2)
        v = torch.cat([ctx_v, v_blk], dim=2)
        out = attend(q, k, v, mask, self.attn_impl, scale=self.scale)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Gemma4DrafterLayer(nn.Module):
    """Sandwich-norm layer; the context enters only as injected keys/values."""

    def __init__(self, c) -> None:
        super().__init__()
        h, eps = c.hidden_size, c.rms_norm_eps
        self.self_attn = Gemma4Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = Gemma4RMSNorm(h, eps)
        self.post_attention_layernorm = Gemma4RMSNorm(h, eps)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(h, eps)
        self.post_feedforward_layernorm = Gemma4RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        )
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


LAYER, NORM = Gemma4DrafterLayer, Gemma4RMSNorm  # this family's classes (deepspec/models/families.py)
