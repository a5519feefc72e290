"""Sequential heads on top of the parallel backbone: the low-rank Markov head and the confidence head.

Both see x_{k-1}, the token before slot k in the block (x_0 = the anchor). In training that is the
ground-truth token (teacher forcing); at inference it is the token just sampled, so
:meth:`MarkovHead.step` must give exactly what :meth:`MarkovHead.forward` gives for the same tokens.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from deepspec.models.config import DrafterSpec


class MarkovHead(nn.Module):
    """Logit bias W2ᵀ·f(W1[x_{k-1}], ...) of rank r added to the backbone's logits at slot k."""

    def __init__(self, c: DrafterSpec) -> None:
        super().__init__()
        r, h = c.markov_rank, c.hidden_size
        self.kind = c.markov_head_type
        self.rank = r
        self.markov_w1 = nn.Embedding(c.vocab_size, r)
        # The input factor reads any target token; the output factor writes the draft vocabulary.
        self.markov_w2 = nn.Linear(r, getattr(c, "out_vocab_size", c.vocab_size), bias=False)
        # Names and shapes as DeepSpec's own heads load them (docs/families.md, "Markov heads").
        if self.kind == "gated":
            self.gate_proj = nn.Linear(h + r, r)
        elif self.kind == "rnn":
            # One joint projection of [s_{k-1}; W1[x_{k-1}]; h_k] into gate, candidate and output parts.
            self.joint_proj = nn.Linear(2 * r + h, 3 * r)

    def init_state(self, n: int, device, dtype) -> Optional[torch.Tensor]:
        return torch.zeros(n, self.rank, device=device, dtype=dtype) if self.kind == "rnn" else None

    def step(
        self, prev: torch.Tensor, h: torch.Tensor, state: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One slot. prev: [N] token ids; h: [N, H]. Returns (bias [N, V], W1[prev] [N, r], new state)."""
        z, e, state = self.step_factors(prev, h, state)
        return self.markov_w2(z), e, state

    def step_factors(
        self, prev: torch.Tensor, h: torch.Tensor, state: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One slot before the output factor: (z [N, r], W1[prev] [N, r], new state); bias = markov_w2(z)."""
        e = self.markov_w1(prev)
        if self.kind == "vanilla":
            z = e
        elif self.kind == "gated":
            z = torch.sigmoid(self.gate_proj(torch.cat([h, e], dim=-1))) * e
        else:
            a, b, o = self.joint_proj(torch.cat([state, e, h], dim=-1)).chunk(3, dim=-1)
            g = torch.sigmoid(a)
            state = g * state + (1 - g) * torch.tanh(b)
            # The bias reads the projection's output part, not the new state.
            z = torch.tanh(o)
        return z, e, state

    def forward(self, prev: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced, all slots. prev: [N, G]; h: [N, G, H] -> (bias [N, G, V], e [N, G, r])."""
        z, e = self.factors(prev, h)
        return self.markov_w2(z), e

    def factors(self, prev: torch.Tensor, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced, all slots, before the output factor: (z [N, G, r], e [N, G, r]); the bias is
        ``markov_w2(z)`` (the fully chunked loss multiplies it out a chunk at a time)."""
        if self.kind != "rnn":
            e = self.markov_w1(prev)
            if self.kind == "vanilla":
                return e, e
            return torch.sigmoid(self.gate_proj(torch.cat([h, e], dim=-1))) * e, e
        state = self.init_state(prev.shape[0], h.device, h.dtype)
        zs, feats = [], []
        for k in range(prev.shape[1]):
            z, e, state = self.step_factors(prev[:, k], h[:, k], state)
            zs.append(z)
            feats.append(e)
        return torch.stack(zs, dim=1), torch.stack(feats, dim=1)


class ConfidenceHead(nn.Module):
    """c_k = σ(w·[h_k ; W1[x_{k-1}]] + b): the chance slot k survives given slots < k did.

    Survival is a different event at T = 0 (the draft must be the target's argmax) than at T > 0
    (the sampling rule accepts with probability 1 − TV(q, p)), so a drafter with
    ``greedy_confidence`` has two outputs on the same features: ``proj`` for the sampling event
    (the only one older drafters have, under the same name) and ``greedy_proj`` for the greedy one.
    """

    def __init__(self, c: DrafterSpec) -> None:
        super().__init__()
        self.with_markov = c.confidence_head_with_markov and c.markov_enabled
        in_dim = c.hidden_size + (c.markov_rank if self.with_markov else 0)
        self.proj = nn.Linear(in_dim, 1)
        self.greedy_proj = nn.Linear(in_dim, 1) if c.greedy_confidence else None

    def forward(
        self, h: torch.Tensor, markov_feat: Optional[torch.Tensor], event: str = "sampling"
    ) -> torch.Tensor:
        """The confidence logit (pre-sigmoid) for ``event`` ("sampling" or "greedy"), shape h.shape[:-1].
        Without a greedy output, "greedy" reads the sampling output (older single-output drafters)."""
        x = torch.cat([h, markov_feat], dim=-1) if self.with_markov else h
        proj = self.greedy_proj if event == "greedy" and self.greedy_proj is not None else self.proj
        return proj(x).squeeze(-1)

    def both(
        self, h: torch.Tensor, markov_feat: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(sampling logits, greedy logits or None without that output), as :meth:`forward` gives them."""
        x = torch.cat([h, markov_feat], dim=-1) if self.with_markov else h
        greedy = self.greedy_proj(x).squeeze(-1) if self.greedy_proj is not None else None
        return self.proj(x).squeeze(-1), greedy
