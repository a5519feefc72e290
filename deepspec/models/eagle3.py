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

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from deepspec.models.attention import AttnMask, attend
from deepspec.models.base import BlockOutput, Draft, Drafter, distribution, sample_rows
from deepspec.models.config import DrafterSpec
from deepspec.models.draft_cache import DraftCache
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

    def _entries_kv(
        self, f_before: torch.Tensor, f: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values [B, kv_heads, T, D] of context entries (ids [B, T] at ``positions`` [B, T]).

        Entry i pairs token x_i with u_i = fc(f_{i-1}): f [B, T, H] are the fc features of these same
        positions and f_before [B, 1, H] that of the position before the first (zeros at position 0).
        An entry depends on nothing later, which is what lets the evaluator cache it."""
        layer = self.layers[0]
        u = torch.cat([f_before, f[:, :-1]], dim=1)
        x_ctx = layer.inputs(self.embed(ids).to(f.dtype), u)
        cos, sin = self.rotary.cos_sin(positions, x_ctx.dtype)
        return layer.self_attn.project_kv(x_ctx, cos, sin)

    def _full_context(self, target_feats: torch.Tensor, ctx_ids: torch.Tensor):
        """(f [B, L, H], context keys, values) of every position, without a cache."""
        b, length, _ = target_feats.shape
        f = self.fc(target_feats.to(self.fc.weight.dtype))  # a bf16 target may feed an fp32 drafter
        positions = torch.arange(length, device=f.device).expand(b, -1)
        k, v = self._entries_kv(f.new_zeros(b, 1, f.shape[-1]), f, ctx_ids, positions)
        return f, k, v

    def _unroll(
        self,
        k_ctx: torch.Tensor,
        v_ctx: torch.Tensor,
        u: torch.Tensor,
        anchors: torch.Tensor,
        first_token: torch.Tensor,
        next_token: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The γ-step recurrence. k_ctx/v_ctx [B, kv_heads, L, D]: the context entries' keys/values
        (positions 0..L-1; those at or after a row's anchor are masked); anchors [B, A] (≤ L);
        u [B, A, H] = fc(f_{p0-1}); first_token [B, A] = x0; ``next_token(j, h_j)`` gives the input
        token of slot j+2 from slot j+1's final-norm hidden [B, A, H]. Returns final-norm hiddens
        [B, A, γ, H]."""
        c = self.config
        layer = self.layers[0]
        length = k_ctx.shape[2]
        keys, values = [k_ctx], [v_ctx]
        tok = first_token
        hs = []
        for j in range(c.block_size):
            x2 = layer.inputs(self.embed(tok).to(u.dtype), u)  # [B, A, 2H]
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

    @staticmethod
    def _u_at(f: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """fc(f_{p0-1}) [B, A, H] for anchors p0 [B, A] (zeros for p0 = 0)."""
        f = torch.cat([f.new_zeros(f.shape[0], 1, f.shape[-1]), f], dim=1)
        return torch.gather(f, 1, anchors[:, :, None].expand(-1, -1, f.shape[-1]))

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
        f, k, v = self._full_context(target_feats, input_ids)
        h = self._unroll(
            k,
            v,
            self._u_at(f, anchors),
            anchors,
            prev_tokens[:, :, 0],
            lambda j, _h: prev_tokens[:, :, j + 1],
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
        f, k, v = self._full_context(target_feats, ctx_ids)
        anchors = torch.tensor([[n]], device=dev)
        tok = torch.tensor([anchor_token], device=dev)
        forced = forced_tokens.view(1, -1) if forced_tokens is not None else None
        return self._sample_chain(
            k, v, self._u_at(f, anchors), anchors, tok, temperature, [generator], forced
        ).row(0)

    @torch.no_grad()
    def extend_cache(
        self, cache: DraftCache, target_feats: torch.Tensor, token_ids: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Commit ``counts[b]`` more positions to row b: their target features [B, T, n·H_t] and token ids
        [B, T]. Keeps each position's fc feature (the next entry and the anchor slot read it) and the
        layer's context keys/values."""
        f = self.fc(target_feats.to(self.fc.weight.dtype))
        b, t, _ = f.shape
        if "f" in cache and cache.max_length > 0:
            # The entry at a row's first new position reads the feature of the position before it.
            before = cache.gather_at("f", (cache.lengths - 1).clamp(min=0))[:, None]
            before = before * (cache.lengths > 0).to(before.dtype)[:, None, None]
        else:
            before = f.new_zeros(b, 1, f.shape[-1])
        positions = cache.lengths[:, None] + torch.arange(t, device=f.device)
        k, v = self._entries_kv(before, f, token_ids.to(f.device), positions)
        cache.write("f", f, dim=1)
        cache.write("k", k, dim=2)
        cache.write("v", v, dim=2)
        cache.advance(counts)

    @torch.no_grad()
    def draft_cached(
        self,
        cache: DraftCache,
        anchor_tokens: torch.Tensor,
        temperature: float,
        generators: Optional[Sequence[Optional[torch.Generator]]] = None,
        forced_tokens: Optional[torch.Tensor] = None,
    ) -> Draft:
        """:meth:`draft` for B rows, reading the context entries from ``cache`` (row b's anchor sits at
        position ``cache.lengths[b]``, which must be ≥ 1: the prompt is never empty)."""
        anchors = cache.lengths[:, None]
        u = cache.gather_at("f", cache.lengths - 1)[:, None]
        return self._sample_chain(
            cache.read("k"),
            cache.read("v"),
            u,
            anchors,
            anchor_tokens,
            temperature,
            generators,
            forced_tokens,
        )

    def _sample_chain(self, k, v, u, anchors, anchor_tokens, temperature, generators, forced) -> Draft:
        """Unroll one block per row (A = 1), drawing each slot's token from its hidden as it goes."""
        tokens, probs = [], []

        def pick(j: int, h: torch.Tensor) -> torch.Tensor:
            q = distribution(self.compute_logits(h[:, 0]).float(), temperature)
            x = sample_rows(q, temperature, generators, forced[:, j] if forced is not None else None)
            tokens.append(x)
            probs.append(q)
            return x[:, None]

        h = self._unroll(k, v, u, anchors, anchor_tokens[:, None], pick)
        pick(self.config.block_size - 1, h[:, :, -1])
        return Draft(
            tokens=torch.stack(tokens, dim=1),
            probs=torch.stack(probs, dim=1),
            confidence=None,
            confidence_logits=None,
        )
