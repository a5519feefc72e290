"""The parallel-block drafter (DSpark; DFlash with its heads off): parallel backbone with KV injection, plus Markov and confidence heads.

A block is the anchor x0 at position p0 followed by γ-1 MASK tokens at p0+1..p0+γ-1; slot k
(k = 1..γ, block index j = k-1) predicts the token at p0+k. Block queries see the injected target
context at positions < p0 and their own block, bidirectionally. With ``markov_rank == 0`` and no
confidence head this is DFlash.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from deepspec.models.attention import AttnMask
from deepspec.models.base import BlockOutput, Draft, Drafter, HeadFactors, distribution, sample_rows
from deepspec.models.config import DrafterSpec
from deepspec.models.draft_cache import DraftCache
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
        self.lm_head = nn.Linear(c.hidden_size, c.out_vocab_size, bias=False)  # the draft vocabulary
        self.markov_head = MarkovHead(c) if c.markov_enabled else None
        self.confidence_head = ConfidenceHead(c) if c.enable_confidence_head else None

    # ------------------------------------------------------------------ backbone
    def context(self, target_feats: torch.Tensor) -> torch.Tensor:
        """[B, L, n·H_t] concatenated target layer outputs -> [B, L, H] injected context."""
        # A bf16 target feeding an fp32 drafter outside autocast (train.mixed_precision=no) must work;
        # under autocast the round trip bf16 -> fp32 -> bf16 is exact.
        return self.hidden_norm(self.fc(target_feats.to(self.fc.weight.dtype)))

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype, longest: Optional[int] = None):
        """The rotary table at ``positions`` [B, T], read as in a forward whose largest position is
        ``longest`` (it matters only for RoPE types whose table depends on the sequence length)."""
        if longest is None or positions.numel() == 0 or longest <= int(positions.max()):
            return self.rotary.cos_sin(positions, dtype)
        ext = torch.cat([positions, positions.new_full((positions.shape[0], 1), longest)], dim=1)
        cos, sin = self.rotary.cos_sin(ext, dtype)
        return cos[:, :-1], sin[:, :-1]

    def context_kv(
        self, ctx: torch.Tensor, positions: torch.Tensor, longest: Optional[int] = None
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's rotated keys/values [B, kv_heads, T, D] of context ``ctx`` [B, T, H] at ``positions`` [B, T].

        A context position's keys depend on nothing but its own feature and position, which is what
        lets the evaluator compute them once (:class:`~deepspec.models.draft_cache.DraftCache`), as
        the target's own KV cache does. (For the length-dependent RoPE types past the target's
        original context, the cached keys keep the table of the forward that committed them, like
        the target's cache, while :meth:`draft` recomputes them with the current one.)"""
        cos, sin = self._cos_sin(positions, ctx.dtype, longest)
        return [layer.self_attn.project_kv(ctx, cos, sin) for layer in self.layers]

    def backbone(
        self,
        ctx_kv: List[Tuple[torch.Tensor, torch.Tensor]],
        block_tokens: torch.Tensor,
        anchors: torch.Tensor,
    ) -> torch.Tensor:
        """ctx_kv: :meth:`context_kv` of context positions 0..L-1; block_tokens: [B, A, γ]; anchors: [B, A]
        -> final-norm hiddens [B, A, γ, H]. Context keys at or after a block's anchor are masked, so
        rows may carry stale keys past their own context length."""
        b, a, g = block_tokens.shape
        ctx_len, dtype = ctx_kv[0][0].shape[2], ctx_kv[0][0].dtype
        x = self.embed(block_tokens).reshape(b, a * g, -1).to(dtype)
        pos = (anchors[:, :, None] + torch.arange(g, device=anchors.device)).reshape(b, a * g)
        # One table for context and block: length-dependent RoPE types see the whole sequence.
        cos, sin = self._cos_sin(pos, x.dtype, ctx_len - 1)
        mask = block_attn_mask(anchors, ctx_len, g)
        for layer, (ctx_k, ctx_v) in zip(self.layers, ctx_kv):
            x = layer(x, cos, sin, ctx_k, ctx_v, mask)
        return self.norm(x).reshape(b, a, g, -1)

    def full_context_kv(
        self, target_feats: torch.Tensor, longest: Optional[int] = None
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`context_kv` of every position of ``target_feats`` [B, L, n·H_t] (no cache), in a
        forward whose largest position is ``longest``."""
        b, length, _ = target_feats.shape
        positions = torch.arange(length, device=target_feats.device).expand(b, -1)
        return self.context_kv(self.context(target_feats), positions, longest)

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
        chunked_head: bool = False,
    ) -> BlockOutput:
        """Teacher-forced forward over many blocks.

        target_feats [B, L, n·H_t]; input_ids [B, L]; anchors [B, A] (positions p0);
        prev_tokens [B, A, γ] = the true x_{k-1} for each slot (x_0 = the anchor).
        ``chunked_head``: return the logits as :class:`HeadFactors` (not for soft-capped logits).
        """
        anchor_tokens = torch.gather(input_ids, 1, anchors)
        longest = int(anchors.max()) + self.config.block_size - 1 if anchors.numel() else None
        h = self.backbone(
            self.full_context_kv(target_feats, longest), self.block_tokens(anchor_tokens), anchors
        )
        if chunked_head and self.config.final_logit_softcapping is None:
            return self._factored(h, prev_tokens)
        logits = self.compute_logits(h)
        feat = None
        if self.markov_head is not None:
            b, a, g, _ = h.shape
            bias, feat = self.markov_head(prev_tokens.reshape(b * a, g), h.reshape(b * a, g, -1))
            # In place: the lm_head output is not saved for backward, and this avoids a third
            # [B, A, γ, V] tensor at the peak of the forward.
            logits = logits.add_(bias.reshape(b, a, g, -1))
            feat = feat.reshape(b, a, g, -1)
        conf, greedy = (
            self.confidence_head.both(h, feat) if self.confidence_head is not None else (None, None)
        )
        return BlockOutput(logits=logits, confidence_logits=conf, hidden=h, greedy_confidence_logits=greedy)

    def _factored(self, h: torch.Tensor, prev_tokens: torch.Tensor) -> BlockOutput:
        b, a, g, _ = h.shape
        z = feat = w2 = None
        if self.markov_head is not None:
            z, feat = self.markov_head.factors(prev_tokens.reshape(b * a, g), h.reshape(b * a, g, -1))
            z, feat, w2 = z.reshape(b, a, g, -1), feat.reshape(b, a, g, -1), self.markov_head.markov_w2.weight
        conf, greedy = (
            self.confidence_head.both(h, feat) if self.confidence_head is not None else (None, None)
        )
        return BlockOutput(
            HeadFactors(h, self.lm_head.weight, z, w2),
            confidence_logits=conf,
            hidden=h,
            greedy_confidence_logits=greedy,
        )

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
        """Propose x1..xγ after ``anchor_token`` at position n = target_feats.shape[1], projecting the
        whole context again (no cache; :meth:`draft_cached` is the evaluator's path).

        target_feats [1, n, n_feat·H_t] are the target's features for positions 0..n-1 (all
        strictly before the anchor). The Markov head samples left to right, feeding back each token.
        ``forced_tokens`` [γ] replaces sampling (used to check against teacher forcing).
        ``context_ids`` (the committed tokens at 0..n-1) is accepted for interface parity with drafters
        that embed the context tokens (EAGLE-3, ``uses_context_ids``); this one reads only the features.
        """
        dev = target_feats.device
        n = target_feats.shape[1]
        anchors = torch.tensor([[n]], device=dev)
        tok = torch.tensor([anchor_token], device=dev)
        ctx_kv = self.full_context_kv(target_feats, n + self.config.block_size - 1)
        h = self.backbone(ctx_kv, self.block_tokens(tok[:, None]), anchors)
        forced = forced_tokens.view(1, -1) if forced_tokens is not None else None
        return self._sample_block(h[:, 0], tok, temperature, [generator], forced).row(0)

    @torch.no_grad()
    def extend_cache(
        self, cache: DraftCache, target_feats: torch.Tensor, token_ids: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Commit ``counts[b]`` more positions to row b: their features ``target_feats`` [B, T, n·H_t]
        (only the first ``counts[b]`` of a row are real). ``token_ids`` is unused (see :meth:`draft`)."""
        ctx = self.context(target_feats)
        positions = cache.lengths[:, None] + torch.arange(ctx.shape[1], device=ctx.device)
        for i, (k, v) in enumerate(self.context_kv(ctx, positions)):
            cache.write(f"k{i}", k, dim=2)
            cache.write(f"v{i}", v, dim=2)
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
        """:meth:`draft` for B rows at once, reading the context from ``cache``: row b's anchor
        ``anchor_tokens[b]`` sits at position ``cache.lengths[b]``. Returns tokens [B, γ], probs [B, γ, V]."""
        ctx_kv = [(cache.read(f"k{i}"), cache.read(f"v{i}")) for i in range(len(self.layers))]
        anchors = cache.lengths[:, None]
        h = self.backbone(ctx_kv, self.block_tokens(anchor_tokens[:, None]), anchors)
        return self._sample_block(h[:, 0], anchor_tokens, temperature, generators, forced_tokens)

    def _sample_block(
        self,
        h: torch.Tensor,
        anchor_tokens: torch.Tensor,
        temperature: float,
        generators: Optional[Sequence[Optional[torch.Generator]]],
        forced_tokens: Optional[torch.Tensor],
    ) -> Draft:
        """Slots 1..γ left to right from the block hiddens h [B, γ, H]: the Markov head reads the token
        just drawn at the slot before (the anchor for slot 1)."""
        base = self.compute_logits(h).float()
        b = h.shape[0]
        state = self.markov_head.init_state(b, h.device, h.dtype) if self.markov_head is not None else None
        prev = anchor_tokens
        tokens, probs, conf_logits = [], [], []
        event = self.config.confidence_event(temperature)  # the acceptance event of this temperature
        for k in range(self.config.block_size):
            logits = base[:, k]
            feat = None
            if self.markov_head is not None:
                bias, feat, state = self.markov_head.step(prev, h[:, k], state)
                logits = logits + bias.float()
            if self.confidence_head is not None:
                conf_logits.append(self.confidence_head(h[:, k], feat, event))
            # Over the target's vocabulary, 0 outside the draft vocabulary: accept/resample stay exact.
            q = distribution(self.to_target_vocab(logits), temperature)
            forced = forced_tokens[:, k] if forced_tokens is not None else None
            prev = sample_rows(q, temperature, generators, forced)
            tokens.append(prev)
            probs.append(q)
        cl = torch.stack(conf_logits, dim=1).float() if conf_logits else None
        return Draft(
            tokens=torch.stack(tokens, dim=1),
            probs=torch.stack(probs, dim=1),
            confidence=torch.sigmoid(cl) if cl is not None else None,
            confidence_logits=cl,
            confidence_event=event if cl is not None else None,
        )
