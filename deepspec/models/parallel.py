"""The parallel-block drafter (DSpark; DFlash with its heads off): parallel backbone with KV injection, plus Markov and confidence heads.

A block is the anchor x0 at position p0 followed by γ-1 MASK tokens at p0+1..p0+γ-1; slot k
(k = 1..γ, block index j = k-1) predicts the token at p0+k. Block queries see the injected target
context at positions < p0 and their own block, bidirectionally. With ``markov_rank == 0`` and no
confidence head this is DFlash.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from deepspec.models.attention import AttnMask
from deepspec.models.base import BlockOutput, Draft, Drafter, distribution
from deepspec.models.config import DrafterSpec
from deepspec.models.families import layer_classes
from deepspec.models.heads import ConfidenceHead, MarkovHead


def visibility_mask(anchors: torch.Tensor, ctx_len: int, block_size: int) -> torch.Tensor:
    """Boolean mask [B, 1, A·γ, ctx_len + A·γ]: True where a block query may attend.

    Context key i is visible to a block anchored at p0 iff i < p0; block keys are visible only
    within the same block (bidirectional).
    """
    b, a = anchors.shape
    dev = anchors.device
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, A·γ]
    ctx = torch.arange(ctx_len, device=dev)[None, None, :] < q_anchor[:, :, None]
    block_id = torch.arange(a, device=dev).repeat_interleave(block_size)
    own = (block_id[:, None] == block_id[None, :]).expand(b, -1, -1)
    return torch.cat([ctx, own], dim=-1).unsqueeze(1)


def block_attn_mask(anchors: torch.Tensor, ctx_len: int, block_size: int) -> AttnMask:
    """:func:`visibility_mask` as an :class:`AttnMask` (dense for SDPA, mask_mod for flex attention)."""
    b, a = anchors.shape
    q_anchor = anchors.repeat_interleave(block_size, dim=1)  # [B, A·γ]

    def mask_mod(bi, _h, q, kv):
        ctx = (kv < ctx_len) & (kv < q_anchor[bi, q])
        own = (kv >= ctx_len) & (
            torch.div(kv - ctx_len, block_size, rounding_mode="floor") == q // block_size
        )
        return ctx | own

    return AttnMask(
        b,
        a * block_size,
        ctx_len + a * block_size,
        lambda: visibility_mask(anchors, ctx_len, block_size),
        mask_mod,
        anchors.device,
    )


class ParallelDrafter(Drafter):
    """The parallel-block drafter: DSpark, or DFlash when both heads are off."""

    def __init__(self, spec: DrafterSpec) -> None:
        super().__init__(spec)
        c = spec
        layer, norm = layer_classes(c.family)  # the target family's layers and norm
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.num_features * c.target_hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = norm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(layer(c) for _ in range(c.num_layers))
        self.norm = norm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.markov_head = MarkovHead(c) if c.markov_enabled else None
        self.confidence_head = ConfidenceHead(c) if c.enable_confidence_head else None

    # ------------------------------------------------------------------ backbone
    def context(self, target_feats: torch.Tensor) -> torch.Tensor:
        """[B, L, n·H_t] concatenated target layer outputs -> [B, L, H] injected context."""
        # A bf16 target feeding an fp32 drafter outside autocast (train.mixed_precision=no) must work;
        # under autocast the round trip bf16 -> fp32 -> bf16 is exact.
        return self.hidden_norm(self.fc(target_feats.to(self.fc.weight.dtype)))

    def backbone(self, ctx: torch.Tensor, block_tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """ctx: [B, L, H]; block_tokens: [B, A, γ]; anchors: [B, A] -> final-norm hiddens [B, A, γ, H]."""
        b, a, g = block_tokens.shape
        length = ctx.shape[1]
        x = self.embed(block_tokens).reshape(b, a * g, -1).to(ctx.dtype)
        pos = (anchors[:, :, None] + torch.arange(g, device=anchors.device)).reshape(b, a * g)
        ctx_pos = torch.arange(length, device=ctx.device).expand(b, -1)
        # One table for context and block: length-dependent RoPE types see the whole sequence.
        cos, sin = self.rotary.cos_sin(torch.cat([ctx_pos, pos], dim=1), x.dtype)
        ccos, csin, cos, sin = cos[:, :length], sin[:, :length], cos[:, length:], sin[:, length:]
        mask = block_attn_mask(anchors, ctx.shape[1], g)
        for layer in self.layers:
            ctx_k, ctx_v = layer.self_attn.project_kv(ctx, ccos, csin)
            x = layer(x, cos, sin, ctx_k, ctx_v, mask)
        return self.norm(x).reshape(b, a, g, -1)

    def block_tokens(self, anchor_tokens: torch.Tensor) -> torch.Tensor:
        """[..., ] anchor ids -> [..., γ] = anchor followed by γ-1 MASKs."""
        masks = torch.full(
            (*anchor_tokens.shape, self.config.block_size - 1),
            self.config.mask_token_id,
            dtype=anchor_tokens.dtype,
            device=anchor_tokens.device,
        )
        return torch.cat([anchor_tokens.unsqueeze(-1), masks], dim=-1)

    # ------------------------------------------------------------------ training
    def forward(
        self,
        target_feats: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        prev_tokens: torch.Tensor,
    ) -> BlockOutput:
        """Teacher-forced forward over many blocks.

        target_feats [B, L, n·H_t]; input_ids [B, L]; anchors [B, A] (positions p0);
        prev_tokens [B, A, γ] = the true x_{k-1} for each slot (x_0 = the anchor).
        """
        anchor_tokens = torch.gather(input_ids, 1, anchors)
        h = self.backbone(self.context(target_feats), self.block_tokens(anchor_tokens), anchors)
        logits = self.compute_logits(h)
        feat = None
        if self.markov_head is not None:
            b, a, g, _ = h.shape
            bias, feat = self.markov_head(prev_tokens.reshape(b * a, g), h.reshape(b * a, g, -1))
            # In place: the lm_head output is not saved for backward, and this avoids a third
            # [B, A, γ, V] tensor at the peak of the forward.
            logits = logits.add_(bias.reshape(b, a, g, -1))
            feat = feat.reshape(b, a, g, -1)
        conf = self.confidence_head(h, feat) if self.confidence_head is not None else None
        return BlockOutput(logits=logits, confidence_logits=conf, hidden=h)

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
        """Propose x1..xγ after ``anchor_token`` at position n = target_feats.shape[1].

        target_feats [1, n, n_feat·H_t] are the target's features for positions 0..n-1 (all
        strictly before the anchor). The Markov head samples left to right, feeding back each token.
        ``forced_tokens`` [γ] replaces sampling (used to check against teacher forcing).
        ``context_ids`` (the committed tokens at 0..n-1) is accepted for interface parity with drafters
        that embed the context tokens (EAGLE-3, ``uses_context_ids``); this one reads only the features.
        """
        c = self.config
        dev = target_feats.device
        n = target_feats.shape[1]
        anchors = torch.tensor([[n]], device=dev)
        tok = torch.tensor([[anchor_token]], device=dev)
        h = self.backbone(self.context(target_feats), self.block_tokens(tok), anchors)[0, 0]  # [γ, H]
        base = self.compute_logits(h).float()
        state = self.markov_head.init_state(1, dev, h.dtype) if self.markov_head is not None else None
        prev = torch.tensor([anchor_token], device=dev)
        tokens, probs, conf_logits = [], [], []
        for k in range(c.block_size):
            logits = base[k]
            feat = None
            if self.markov_head is not None:
                bias, feat, state = self.markov_head.step(prev, h[k : k + 1], state)
                logits = logits + bias[0].float()
            if self.confidence_head is not None:
                conf_logits.append(self.confidence_head(h[k : k + 1], feat)[0])
            q = distribution(logits, temperature)
            if forced_tokens is not None:
                x = forced_tokens[k].view(1).to(dev)
            elif temperature == 0:
                x = q.argmax().view(1)
            else:
                x = torch.multinomial(q, 1, generator=generator)
            tokens.append(x)
            probs.append(q)
            prev = x
        cl = torch.stack(conf_logits).float() if conf_logits else None
        return Draft(
            tokens=torch.cat(tokens),
            probs=torch.stack(probs),
            confidence=torch.sigmoid(cl) if cl is not None else None,
            confidence_logits=cl,
        )
