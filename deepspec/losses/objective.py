"""The training objective: 0.1·CE + 0.9·L1(q, p) + 1.0·BCE(c, c*) (+ 1.0·BCE of the greedy confidence
output), slot-decayed and normalised (docs/method.md, Losses), and the sums the training metrics are
read from.

The same function trains every drafter: DFlash sets only the CE weight, EAGLE-3 only the soft-CE
weight (configs/model/*.yaml). The per-slot full-vocabulary terms are computed by
:mod:`deepspec.losses.vocab_terms` (chunked, never holding fp32 probabilities of the whole batch).

Every term is a *sum* over valid slots of w_k·term, divided by ``denominator``: the sum of w_k·valid
over the whole global batch (all ranks, all micro-batches of the step). The caller computes that
sum before the first backward so the update does not depend on how the batch was split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from deepspec.config import LossImpl, check_choice
from deepspec.data.anchors import BlockTargets, slot_weights
from deepspec.losses.agreement import greedy_acceptance
from deepspec.losses.vocab_terms import HeadLogits, block_row_stats, reference_row_stats
from deepspec.models.base import soft_cap


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate (already divided by the denominator)
    sums: Dict[str, torch.Tensor]  # detached weighted sums for logging: ce, l1, bce, weight


def target_logits(
    target_final: torch.Tensor,
    target_pos: torch.Tensor,
    lm_head: torch.nn.Module,
    lazy: bool = False,
    softcap: Optional[float] = None,
):
    """Target logits for each slot from the final-norm hidden at p0+k-1: [B, A, γ, V].

    ``lazy=True`` returns a :class:`~deepspec.losses.vocab_terms.HeadLogits` instead: the gathered hiddens and
    the lm_head weight, from which the lean loss computes the logits a chunk at a time (the literal
    loss materialises them). Either way the values are those of ``lm_head`` (bias-free). ``softcap``
    (a target's ``final_logit_softcapping``, Gemma 4) gives ``softcap·tanh(logits/softcap)``, as the
    target computes them; the lazy form cannot carry it, so those logits are always materialised.
    """
    b, a, g = target_pos.shape
    idx = target_pos.reshape(b, a * g, 1).expand(-1, -1, target_final.shape[-1])
    h = torch.gather(target_final, 1, idx).reshape(b, a, g, -1)
    if lazy and softcap is None and getattr(lm_head, "bias", None) is None:
        # The dtype lm_head would compute in here (bf16 under autocast), so the values are the same.
        dev = h.device.type
        cd = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else lm_head.weight.dtype
        return HeadLogits(h.detach().to(cd), lm_head.weight.detach().to(cd))
    with torch.no_grad():
        logits = lm_head(h.to(lm_head.weight.dtype))
        return logits if softcap is None else soft_cap(logits, softcap)


def mix(terms: Dict[str, Any], loss_cfg):
    """The weighted sum of the loss terms (tensors or floats keyed ce, l1, bce, soft_ce): the loss that
    is backpropagated and the one that is logged. A term whose weight is 0 is left out, so a drafter
    without a confidence head or soft CE adds nothing for them."""
    total = loss_cfg.ce_weight * terms["ce"] + loss_cfg.l1_weight * terms["l1"]
    soft_w = float(getattr(loss_cfg, "soft_ce_weight", 0.0) or 0.0)
    if soft_w:
        total = total + soft_w * terms.get("soft_ce", 0.0)
    if loss_cfg.confidence_weight:
        total = total + loss_cfg.confidence_weight * terms["bce"]
    greedy_w = float(getattr(loss_cfg, "greedy_confidence_weight", 0.0) or 0.0)
    if greedy_w and "bce_greedy" in terms:
        total = total + greedy_w * terms["bce_greedy"]
    return total


def weighted_valid(valid: torch.Tensor, decay_gamma: float) -> torch.Tensor:
    return valid * slot_weights(valid.shape[-1], decay_gamma, valid.device)


def dspark_loss(
    draft_logits: torch.Tensor,
    confidence_logits,
    tgt_logits: torch.Tensor,
    targets: BlockTargets,
    loss_cfg,
    denominator: float,
    draft_ids: Optional[torch.Tensor] = None,
    greedy_confidence_logits: Optional[torch.Tensor] = None,
) -> LossOutput:
    """draft_logits [B, A, γ, d], tgt_logits [B, A, γ, V] (tgt_logits may be lazy:
    ``target_logits(..., lazy=True)``; draft_logits may be the drafter's HeadFactors with
    ``loss.chunked_head``); confidence_logits [B, A, γ] or None.

    ``draft_ids`` [d]: the target id of each draft id when the drafter has a draft vocabulary
    (docs/training.md, "Draft vocabulary"): a label it cannot draft adds no CE, and the target's
    mass outside the draft vocabulary counts fully in L1 (q is 0 there).

    ``loss_cfg.impl`` = "lean" (default: chunked, recomputed in backward, see deepspec/losses/vocab_terms.py)
    or "reference" (the literal full-vocabulary version); both give the same values and gradients.
    ``loss_cfg.soft_ce_weight`` adds the soft CE to the target's distribution (the EAGLE-3 loss).

    ``greedy_confidence_logits`` [B, A, γ] (the confidence head's greedy output) adds
    ``loss_cfg.greedy_confidence_weight``·BCE against the greedy acceptance event: 1 where the
    drafter's argmax is the target's (:func:`~deepspec.losses.agreement.greedy_acceptance`).
    """
    w = weighted_valid(targets.valid, loss_cfg.decay_gamma)
    soft_w = float(getattr(loss_cfg, "soft_ce_weight", 0.0) or 0.0)
    impl = getattr(loss_cfg, "impl", "lean")
    check_choice("loss.impl", impl, LossImpl)
    # The chunked head takes both argmaxes (the greedy event below) in its own pass over the logits.
    argmax = {} if greedy_confidence_logits is not None else None
    if impl == "lean":
        ce, sce, l1 = block_row_stats(
            draft_logits,
            tgt_logits,
            targets.labels,
            targets.valid,
            int(getattr(loss_cfg, "chunk_size", 0)),
            with_soft_ce=soft_w != 0,
            draft_ids=draft_ids,
            # The loss below is Σ w·(ce_weight·ce + soft_w·sce + l1_weight·l1) + (BCE against the detached
            # c*) over the denominator: the chunked head forms its gradients in the forward from these.
            row_weights=torch.stack([loss_cfg.ce_weight * w, soft_w * w, loss_cfg.l1_weight * w]),
            argmax=argmax,
        )
    else:
        ce, sce, l1 = reference_row_stats(
            draft_logits, tgt_logits, targets.labels, with_soft_ce=soft_w != 0, draft_ids=draft_ids
        )
    accept = (1.0 - 0.5 * l1).detach().clamp(0.0, 1.0)  # c*_k, analytic acceptance at T=1
    zero = torch.zeros((), dtype=torch.float32, device=targets.valid.device)
    bce = zero
    if confidence_logits is not None:
        bce = F.binary_cross_entropy_with_logits(confidence_logits.float(), accept, reduction="none")
    ce_s, l1_s, sce_s = (w * ce).sum(), (w * l1).sum(), (w * sce).sum()
    bce_s = (w * bce).sum() if confidence_logits is not None else zero
    terms = {"ce": ce_s, "l1": l1_s, "bce": bce_s, "soft_ce": sce_s}
    greedy = None
    if greedy_confidence_logits is not None:
        greedy = greedy_acceptance(draft_logits, tgt_logits, draft_ids, argmax)  # 0/1, the T = 0 event
        bce_g = F.binary_cross_entropy_with_logits(greedy_confidence_logits.float(), greedy, reduction="none")
        terms["bce_greedy"] = (w * bce_g).sum()
    total = mix(terms, loss_cfg)
    sums = {k: v.detach() for k, v in terms.items()}
    sums["weight"] = w.sum().detach()
    sums.update(acceptance_sums(accept, targets.valid, confidence_logits))
    if greedy is not None:
        g = acceptance_sums(greedy, targets.valid, greedy_confidence_logits)
        sums["greedy_accept_k"] = g["accept_k"]
        sums["conf_abs_err_greedy"] = g["conf_abs_err"]
    return LossOutput(loss=total / denominator, sums=sums)


def acceptance_sums(accept: torch.Tensor, valid: torch.Tensor, confidence_logits) -> Dict[str, torch.Tensor]:
    """Sums for accept-rate@k and the τ estimate, reduced later over ranks and micro-batches.

    τ estimate per block = 1 + Σ_k Π_{i≤k} c*_i, over blocks whose γ slots are all valid (blocks cut
    by the end of the answer would bias it down).
    """
    out = {
        "accept_k": (accept * valid).sum(dim=(0, 1)).detach(),
        "valid_k": valid.sum(dim=(0, 1)).detach(),
    }
    full = valid.prod(dim=-1)
    tau = 1.0 + torch.cumprod(accept, dim=-1).sum(-1)
    out["tau"] = (tau * full).sum().detach()
    out["full_blocks"] = full.sum().detach()
    if confidence_logits is not None:
        err = (torch.sigmoid(confidence_logits.float()) - accept).abs()
        out["conf_abs_err"] = (err * valid).sum().detach()
    return out


def summarise(sums: Dict[str, torch.Tensor], loss_cfg) -> Dict[str, float]:
    """Training metrics from loss sums reduced over ranks and micro-batches: the loss and its terms
    per unit of slot weight, the τ estimate, accept-rate@k and the confidence head's mean error."""
    w = max(float(sums["weight"]), 1e-9)
    m = {
        "loss": mix(
            {k: float(sums.get(k, 0.0)) for k in ("ce", "l1", "bce", "soft_ce", "bce_greedy")}, loss_cfg
        )
        / w,
        "ce": float(sums["ce"]) / w,
        "l1": float(sums["l1"]) / w,
        "bce": float(sums["bce"]) / w,
        "tau_est": float(sums["tau"]) / max(float(sums["full_blocks"]), 1.0),
    }
    acc = (sums["accept_k"] / sums["valid_k"].clamp(min=1)).tolist()
    for k, a in enumerate(acc, start=1):
        m[f"accept@{k}"] = a
    if "conf_abs_err" in sums:
        m["conf_abs_err"] = float(sums["conf_abs_err"]) / max(float(sums["valid_k"].sum()), 1.0)
    if "greedy_accept_k" in sums:  # the greedy event (T = 0) and its confidence output
        m["bce_greedy"] = float(sums["bce_greedy"]) / w
        greedy = (sums["greedy_accept_k"] / sums["valid_k"].clamp(min=1)).tolist()
        for k, a in enumerate(greedy, start=1):
            m[f"greedy_accept@{k}"] = a
        m["conf_abs_err_greedy"] = float(sums["conf_abs_err_greedy"]) / max(float(sums["valid_k"].sum()), 1.0)
    return m
