"""What every drafter is: the :class:`Drafter` base class and the outputs it returns.

A drafter reads the target's features (the concatenated outputs of the layers in
``spec.target_layer_ids``), shares the target's frozen embedding and lm_head, and proposes
``block_size`` tokens after an anchor. Two kinds exist: the parallel-block drafter (DSpark, and
DFlash with its heads off; :mod:`deepspec.models.parallel`) and the autoregressive EAGLE-3 baseline
(:mod:`deepspec.models.eagle3`). Build one with :func:`deepspec.models.build_drafter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from deepspec.models.config import DrafterSpec
from deepspec.models.draft_cache import DraftCache
from deepspec.models.rope import RotaryEmbedding
from deepspec.models.vocab import check_maps, ids_from_d2t, maps_from_ids


@dataclass
class BlockOutput:
    logits: torch.Tensor  # [B, A, γ, d] draft logits (backbone + Markov bias), or HeadFactors
    confidence_logits: Optional[torch.Tensor]  # [B, A, γ] pre-sigmoid, or None without the head
    hidden: torch.Tensor  # [B, A, γ, H] final-norm block hiddens
    # [B, A, γ] the confidence head's greedy-acceptance output, None without it (docs/method.md, Confidence head)
    greedy_confidence_logits: Optional[torch.Tensor] = None


@dataclass
class HeadFactors:
    """The drafter's logits ``hidden @ lm_head.T + markov_z @ markov_w2.T`` left unmultiplied
    (``loss.chunked_head``): the lean loss forms them a chunk of block positions at a time and
    recomputes them in backward, so no [positions x vocabulary] tensor exists."""

    hidden: torch.Tensor  # [B, A, γ, H] final-norm block hiddens (carries the gradient)
    lm_head: torch.Tensor  # [d, H] frozen
    markov_z: Optional[torch.Tensor] = None  # [B, A, γ, r] the Markov head's factor (carries the gradient)
    markov_w2: Optional[torch.Tensor] = None  # [d, r] trainable

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.lm_head.shape[0]))


@dataclass
class Draft:
    """One block of proposals; :meth:`Drafter.draft_cached` returns B of them stacked (a leading [B] axis)."""

    tokens: torch.Tensor  # [γ] proposed tokens x1..xγ
    probs: torch.Tensor  # [γ, V] distributions they were drawn from (one-hot at T=0)
    # [γ] σ(confidence logit), raw (uncalibrated), of the acceptance event of the temperature drafted
    # at (DrafterSpec.confidence_event: the greedy output at T = 0 when the drafter has one)
    confidence: Optional[torch.Tensor]
    confidence_logits: Optional[torch.Tensor]  # [γ]
    confidence_event: Optional[str] = None  # "greedy" | "sampling": what the confidences predict

    def row(self, b: int) -> Draft:
        """Row ``b`` of a stacked draft."""
        return Draft(
            tokens=self.tokens[b],
            probs=self.probs[b],
            confidence=self.confidence[b] if self.confidence is not None else None,
            confidence_logits=self.confidence_logits[b] if self.confidence_logits is not None else None,
            confidence_event=self.confidence_event,
        )


class Drafter(nn.Module):
    """Base of every drafter. Subclasses register ``embed_tokens`` and ``lm_head`` (the target's, frozen
    by :meth:`load_target_head`), ``fc`` (target features -> hidden), ``layers``, ``norm``, and
    ``markov_head`` / ``confidence_head`` (None where the kind has none), and implement
    :meth:`forward` (teacher-forced training over many blocks) and :meth:`draft` (one block at
    inference)."""

    # True when draft() needs the committed token ids before the anchor (the evaluator passes them).
    uses_context_ids: bool = False

    embed_tokens: nn.Embedding
    lm_head: nn.Linear
    markov_head: Optional[nn.Module]
    confidence_head: Optional[nn.Module]

    def __init__(self, spec: DrafterSpec) -> None:
        super().__init__()
        self.config = spec
        # The target's rotary table (RoPE scaling included): positions mean what they meant to the target.
        self.rotary = RotaryEmbedding(spec.rope, spec.head_dim, spec.max_position_embeddings)
        if spec.pruned:
            # The draft vocabulary's maps (deepspec/models/vocab.py), saved with the weights under the
            # names engines read. Identity until set_draft_vocab / a loaded state dict fills them.
            d2t, t2d = maps_from_ids(torch.arange(spec.draft_vocab_size), spec.vocab_size)
            self.register_buffer("d2t", d2t)
            self.register_buffer("t2d", t2d)

    # ------------------------------------------------------------------ the draft vocabulary
    def draft_ids(self) -> Optional[torch.Tensor]:
        """Target id of each draft id (int64 [d]), or None for a drafter over the whole vocabulary."""
        return ids_from_d2t(self.d2t) if self.config.pruned else None

    def set_draft_vocab(self, draft_ids: torch.Tensor) -> None:
        """Fill the maps from ascending target ids (call before :meth:`load_target_head`)."""
        c = self.config
        if not c.pruned:
            raise ValueError(
                "set_draft_vocab: this drafter has the whole vocabulary (model.draft_vocab_size=0)"
            )
        if draft_ids.numel() != c.draft_vocab_size:
            raise ValueError(
                f"{draft_ids.numel()} draft ids given; model.draft_vocab_size={c.draft_vocab_size}"
            )
        d2t, t2d = maps_from_ids(draft_ids.to(self.d2t.device), c.vocab_size)
        check_maps(d2t, t2d, c.vocab_size)
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., d] -> target-vocabulary logits [..., V], -inf outside the draft
        vocabulary (so the drafter's distribution is 0 there); unchanged for a whole-vocabulary drafter."""
        if not self.config.pruned:
            return logits
        out = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return out.index_copy_(-1, self.draft_ids(), logits)

    # ------------------------------------------------------------------ the target's conventions
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The target's input embedding of ``ids`` (times its embedding scale: sqrt(H) for Gemma 4)."""
        e = self.embed_tokens(ids)
        scale = self.config.embed_scale
        # Gemma casts the scale to the weight dtype first (sqrt(3072) is 55.5 in bf16); so do we.
        return e if scale == 1.0 else e * torch.tensor(scale, dtype=e.dtype, device=e.device)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Backbone logits from final-norm hiddens: the frozen lm_head, soft-capped where the target is."""
        return soft_cap(self.lm_head(h), self.config.final_logit_softcapping)

    def forward(
        self,
        target_feats: torch.Tensor,
        input_ids: torch.Tensor,
        anchors: torch.Tensor,
        prev_tokens: torch.Tensor,
    ) -> BlockOutput:
        """target_feats [B, L, n·H_t]; input_ids [B, L]; anchors [B, A] (positions p0);
        prev_tokens [B, A, γ] = the true x_{k-1} for each slot (x_0 = the anchor)."""
        raise NotImplementedError

    def draft(
        self,
        target_feats: torch.Tensor,
        anchor_token: int,
        temperature: float,
        generator: Optional[torch.Generator] = None,
        forced_tokens: Optional[torch.Tensor] = None,
        context_ids: Optional[torch.Tensor] = None,
    ) -> Draft:
        """Propose x1..xγ after ``anchor_token`` at position n = target_feats.shape[1], from the whole
        context (no cache): the reference the cached path must reproduce."""
        raise NotImplementedError

    # The evaluator's path: the context is projected once per position into a DraftCache
    # (deepspec/models/draft_cache.py) and B prompts are drafted together.
    def extend_cache(
        self, cache: DraftCache, target_feats: torch.Tensor, token_ids: torch.Tensor, counts: torch.Tensor
    ) -> None:
        """Commit ``counts[b]`` more positions to row b of ``cache``, starting at ``cache.lengths[b]``:
        target_feats [B, T, n·H_t] and token_ids [B, T] of those positions (a row's first
        ``counts[b]`` entries are real, the rest padding)."""
        raise NotImplementedError

    def draft_cached(
        self,
        cache: DraftCache,
        anchor_tokens: torch.Tensor,
        temperature: float,
        generators: Optional[Sequence[Optional[torch.Generator]]] = None,
        forced_tokens: Optional[torch.Tensor] = None,
    ) -> Draft:
        """:meth:`draft` for B rows: row b's anchor ``anchor_tokens[b]`` at position ``cache.lengths[b]``,
        sampled with ``generators[b]``. Returns a stacked Draft (tokens [B, γ], probs [B, γ, V])."""
        raise NotImplementedError

    # ------------------------------------------------------------------ setup
    def init_weights(self, std: float = 0.02, seed: Optional[int] = None) -> None:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.startswith(("embed_tokens", "lm_head")):
                continue
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name == "markov_head.markov_w2.weight":
                # Start as the plain backbone (DFlash); the head learns its correction.
                nn.init.zeros_(p)
            else:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def load_target_head(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Copy the target's embedding and lm_head in and freeze them. A pruned drafter keeps the
        lm_head rows of its draft vocabulary (its maps must be set first)."""
        if self.config.pruned:
            if lm_head_weight.shape[0] != self.config.vocab_size:
                raise ValueError(
                    f"target lm_head has {lm_head_weight.shape[0]} rows; this drafter's draft vocabulary maps a "
                    f"{self.config.vocab_size}-token target vocabulary"
                )
            lm_head_weight = lm_head_weight.index_select(0, self.draft_ids().to(lm_head_weight.device))
        for mod, w, name in (
            (self.embed_tokens, embed_weight, "embedding"),
            (self.lm_head, lm_head_weight, "lm_head"),
        ):
            if tuple(w.shape) != tuple(mod.weight.shape):
                raise ValueError(
                    f"target {name} has shape {tuple(w.shape)}; drafter expects {tuple(mod.weight.shape)}"
                )
            with torch.no_grad():
                mod.weight.copy_(w)
            mod.weight.requires_grad_(False)

    def freeze_target_head(self) -> None:
        """Mark the shared embedding and lm_head frozen (after loading them from a file)."""
        for mod in (self.embed_tokens, self.lm_head):
            mod.weight.requires_grad_(False)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def soft_cap(logits: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """``cap·tanh(logits/cap)`` (final logit soft-capping), or the logits unchanged when ``cap`` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampling distribution at ``temperature`` (T=0: one-hot on the argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def sample_rows(
    q: torch.Tensor,
    temperature: float,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    forced: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One token per row of the distributions q [B, V]: ``forced`` [B] if given, the argmax at T=0,
    else a draw from row b with ``generators[b]`` (each prompt its own stream, so a row's draws do not
    depend on which other rows share the batch)."""
    if forced is not None:
        return forced.to(q.device).long()
    if temperature == 0:
        return q.argmax(-1)
    gens = list(generators) if generators is not None else [None] * q.shape[0]
    if len(gens) != q.shape[0]:
        raise ValueError(f"{len(gens)} generators for {q.shape[0]} rows")
    return torch.cat([torch.multinomial(q[b], 1, generator=g) for b, g in enumerate(gens)])
