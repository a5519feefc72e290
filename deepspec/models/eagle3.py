"""EAGLE-3 baseline: one autoregressive decoder layer over [target features ; token embedding].

What it is (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
via Training-Time Test"), in this toolkit's terms:

* Context entry at position i: the token x_i and ``u_i = fc(f_{i-1})``, where f is the concatenation
  of the selected target layer outputs at position i-1 (u_0 = 0, there is no earlier feature). The
  layer's input is ``[input_layernorm(embed(x_i)) ; hidden_norm(u_i)]`` (2H), from which q/k/v are
  projected; the residual stream is ``u_i``; then the usual post-attention norm and SwiGLU MLP.
* A block anchored at p0 (anchor x0 = the last committed token, at position p0) is drafted
  autoregressively: slot 1 is the real entry (x0, fc(f_{p0-1})); slot k > 1 reads the token drafted
  at slot k-1 and, instead of a target feature (which does not exist yet), the drafter's *own*
  output hidden of slot k-1. Slot k attends causally to the context entries < p0 and to slots 1..k.
  Its final-norm hidden goes through the (frozen, full-vocabulary) lm_head and predicts x_{p0+k}.
* Training-time test: training unrolls exactly that recurrence over the γ slots of every block,
  feeding back its own hiddens (gradients flow through the unroll) and the ground-truth tokens, so
  training sees the inputs inference will see. The loss is the soft cross-entropy to the target's
  distribution with step weights 0.8^(k-1) (configs/model/eagle3.yaml).

So training (``forward``) and inference (``draft``) run one routine, :meth:`Eagle3Drafter._unroll`.
It is a :class:`~deepspec.models.base.Drafter` like the parallel drafter, so the training loop, the
loss and the evaluator treat it like any drafter; ``draft`` needs the committed token ids (``context_ids``), which the evaluator passes to drafters that declare
``uses_context_ids``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from deepspec.models.attention import AttnMask, attend
from deepspec.models.base import BlockOutput, Draft, Drafter, distribution
from deepspec.models.config import DrafterSpec
from deepspec.models.layers import MLP, Attention, RMSNorm, apply_rope


def ttt_mask(anchors: torch.Tensor, ctx_len: int, num_slots: int) -> AttnMask:
    """Visibility for unroll step ``num_slots`` (1-based): keys are [context (ctx_len) ; slot 1 of every
    block (A) ; ... ; slot ``num_slots`` of every block (A)]; query a sees context < anchors[:, a] and
    the slots of its own block."""
    b, a = anchors.shape
    dev = anchors.device

    def dense() -> torch.Tensor:
        ctx = torch.arange(ctx_len, device=dev)[None, None, :] < anchors[:, :, None]  # [B, A, Lc]
        own = torch.eye(a, dtype=torch.bool, device=dev).repeat(1, num_slots).expand(b, -1, -1)
        return torch.cat([ctx, own], dim=-1).unsqueeze(1)

    def mask_mod(bi, _h, q, kv):
        ctx = (kv < ctx_len) & (kv < anchors[bi, q])
        own = (kv >= ctx_len) & (torch.remainder(kv - ctx_len, a) == q)
        return ctx | own

    return AttnMask(b, a, ctx_len + num_slots * a, dense, mask_mod, dev)


class Eagle3Layer(nn.Module):
    def __init__(self, c: DrafterSpec) -> None:
        super().__init__()
        h = c.hidden_size
        self.hidden_norm = RMSNorm(h, c.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.self_attn = Attention(c, in_features=2 * h)
        self.post_attention_layernorm = RMSNorm(h, c.rms_norm_eps)
        self.mlp = MLP(c)

    def inputs(self, emb: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[input_layernorm(embedding) ; hidden_norm(u)]: the 2H vector q/k/v are projected from."""
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(u.to(emb.dtype))], dim=-1)

    def forward(self, x2, u, cos, sin, keys, values, mask) -> torch.Tensor:
        """Queries from ``x2`` [B, T, 2H] over ``keys``/``values`` (which already hold their own); residual ``u``."""
        at = self.self_attn
        b, t, _ = x2.shape
        q = at.q_proj(x2).view(b, t, at.n_heads, at.head_dim).transpose(1, 2)
        if at.use_qk_norm:
            q = at.q_norm(q)
        q = apply_rope(q, cos, sin)
        out = attend(q, keys, values, mask, at.attn_impl)
        h = u + at.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.post_attention_layernorm(h))


class Eagle3Drafter(Drafter):
    uses_context_ids = True  # draft() embeds the committed token ids

    def __init__(self, spec: DrafterSpec) -> None:
        super().__init__(spec)
        c = spec
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.num_features * c.target_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(c)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.markov_head = None
        self.confidence_head = None

    def _unroll(
        self,
        target_feats: torch.Tensor,
        ctx_ids: torch.Tensor,
        anchors: torch.Tensor,
        first_token: torch.Tensor,
        next_token: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The γ-step recurrence. target_feats [B, L, n·H_t] and ctx_ids [B, L] cover positions 0..L-1;
        anchors [B, A] (≤ L); first_token [B, A] = x0; ``next_token(j, h_j)`` gives the input token of
        slot j+2 from slot j+1's final-norm hidden [B, A, H]. Returns final-norm hiddens [B, A, γ, H]."""
        c = self.config
        layer = self.layers[0]
        b, length, _ = target_feats.shape
        dev = target_feats.device
        f = self.fc(target_feats.to(self.fc.weight.dtype))  # a bf16 target may feed an fp32 drafter
        f = torch.cat([f.new_zeros(b, 1, f.shape[-1]), f], dim=1)  # f[:, i] = fc(feature at i-1), f[:, 0] = 0
        x_ctx = layer.inputs(self.embed(ctx_ids).to(f.dtype), f[:, :length])
        pos = torch.arange(length, device=dev).expand(b, -1)
        ccos, csin = self.rotary.cos_sin(pos, x_ctx.dtype)
        k_ctx, v_ctx = layer.self_attn.project_kv(x_ctx, ccos, csin)
        keys, values = [k_ctx], [v_ctx]
        u = torch.gather(f, 1, anchors[:, :, None].expand(-1, -1, f.shape[-1]))  # fc(f_{p0-1})
        tok = first_token
        hs = []
        for j in range(c.block_size):
            x2 = layer.inputs(self.embed(tok).to(f.dtype), u)  # [B, A, 2H]
            cos, sin = self.rotary.cos_sin(anchors + j, x2.dtype)
            k_j, v_j = layer.self_attn.project_kv(x2, cos, sin)
            keys.append(k_j)
            values.append(v_j)
            u = layer(
                x2, u, cos, sin, torch.cat(keys, 2), torch.cat(values, 2), ttt_mask(anchors, length, j + 1)
            )
            hs.append(self.norm(u))
            if j + 1 < c.block_size:
                tok = next_token(j, hs[-1])
        return torch.stack(hs, dim=2)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        target_feats: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        prev_tokens: torch.Tensor,
    ) -> BlockOutput:
        """Training-time test over many blocks, teacher-forced on the tokens: slot k reads the true
        x_{k-1} (``prev_tokens`` [B, A, γ], x_0 = anchor) and the drafter's own hidden of slot k-1."""
        h = self._unroll(
            target_feats, input_ids, anchors, prev_tokens[:, :, 0], lambda j, _h: prev_tokens[:, :, j + 1]
        )
        return BlockOutput(logits=self.compute_logits(h), confidence_logits=None, hidden=h)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def draft(
        self,
        target_feats: torch.Tensor,
        anchor_token: int,
        temperature: float,
        generator: Optional[torch.Generator] = None,
        forced_tokens: Optional[torch.Tensor] = None,
        context_ids: Optional[torch.Tensor] = None,
    ) -> Draft:
        """Draft x1..xγ after ``anchor_token`` at position n = target_feats.shape[1], one layer pass per
        token. ``context_ids`` [1, n] (or [n]) are the committed tokens at 0..n-1 (required: EAGLE-3
        embeds them); ``forced_tokens`` [γ] replaces sampling (to check against teacher forcing)."""
        if context_ids is None:
            raise ValueError(
                "the EAGLE-3 drafter needs context_ids (the committed token ids before the anchor)"
            )
        dev = target_feats.device
        ctx_ids = torch.as_tensor(context_ids, device=dev).reshape(1, -1)
        n = target_feats.shape[1]
        if ctx_ids.shape[1] != n:
            raise ValueError(
                f"context_ids has {ctx_ids.shape[1]} tokens but target_feats covers {n} positions"
            )
        tokens, probs = [], []

        def pick(k: int, h: torch.Tensor) -> torch.Tensor:
            q = distribution(self.compute_logits(h[0, 0]).float(), temperature)
            if forced_tokens is not None:
                x = forced_tokens[k].view(1).to(dev)
            elif temperature == 0:
                x = q.argmax().view(1)
            else:
                x = torch.multinomial(q, 1, generator=generator)
            tokens.append(x)
            probs.append(q)
            return x.view(1, 1)

        h = self._unroll(
            target_feats,
            ctx_ids,
            torch.tensor([[n]], device=dev),
            torch.tensor([[anchor_token]], device=dev),
            pick,
        )
        pick(self.config.block_size - 1, h[:, :, -1])
        return Draft(
            tokens=torch.cat(tokens), probs=torch.stack(probs), confidence=None, confidence_logits=None
        )
