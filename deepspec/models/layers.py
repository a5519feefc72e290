"""Drafter transformer layer with KV injection (Qwen3 / Llama family).

Parameter names follow the HF Qwen3/Llama layer (``self_attn.q_proj``, ``mlp.gate_proj`` ...) so the
native export is a plain state_dict dump.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.activations import ACT2FN

from deepspec.models.attention import attend
from deepspec.models.config import DrafterSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, T, D]; cos/sin: [B, T, D]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, c: DrafterSpec, in_features: int | None = None) -> None:
        super().__init__()
        d_in = in_features or c.hidden_size  # EAGLE-3 projects [embedding ; hidden] (2H) to q/k/v
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.attn_impl = c.attn_impl
        self.q_proj = nn.Linear(d_in, self.n_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(d_in, self.n_kv * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.use_qk_norm = c.use_qk_norm
        if c.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Keys/values of ``x`` [B, T, H] at the positions of ``cos``/``sin``: [B, kv_heads, T, D]."""
        k = self._heads(self.k_proj(x), self.n_kv)
        v = self._heads(self.v_proj(x), self.n_kv)
        if self.use_qk_norm:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        """Block queries ``x`` attend to [context keys ; block keys] under boolean ``mask``.

        x: [B, T, H]; ctx_k/ctx_v: [B, kv, Lc, D] (already rotated); mask: an
        :class:`~deepspec.models.attention.AttnMask` or a bool tensor [B, 1, T, Lc+T] (True = see).
        """
        q = self._heads(self.q_proj(x), self.n_heads)
        if self.use_qk_norm:
            q = self.q_norm(q)
        q = apply_rope(q, cos, sin)
        k_blk, v_blk = self.project_kv(x, cos, sin)
        k = torch.cat([ctx_k, k_blk], dim=2)
        v = torch.cat([ctx_v, v_blk], dim=2)
        out = attend(q, k, v, mask, self.attn_impl)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, c: DrafterSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        # The target's activation (SiLU for Qwen3/Llama, tanh-GELU for Gemma 4).
        self.act = F.silu if c.hidden_act == "silu" else ACT2FN[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    """Pre-norm layer; the context enters only as injected keys/values (it is never run through MLPs)."""

    def __init__(self, c: DrafterSpec) -> None:
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, ctx_k, ctx_v, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx_k, ctx_v, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


LAYER, NORM = DrafterLayer, RMSNorm  # this family's classes (deepspec/models/families.py)
