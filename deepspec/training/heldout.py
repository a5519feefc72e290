"""Held-out τ estimate at checkpoint time: the training metric (1 + Σ_k Π_{i≤k} c*_i per full block,
c*_k = 1 − ½‖q_k − p_k‖₁ at T = 1) on a few held-out sequences, teacher-forced like training.

It is cheap (one target and drafter forward per sequence, no decoding) and ranks checkpoints for the
"keep best" retention rule. Every rank scores the same sequences (ZeRO-3 needs every rank in each
forward), so no reduction is needed.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from deepspec.data.batching import collate
from deepspec.training.distributed import bf16_autocast

log = logging.getLogger("deepspec")

HELDOUT_ANCHOR_SEED_OFFSET = 7_777  # anchors of held-out sequences do not reuse training draws


class HeldoutScorer:
    def __init__(self, run, acc, num_sequences: int) -> None:
        from deepspec.training.setup import tokenize_records

        self.run, self.acc = run, acc
        self.examples = []
        records = list(getattr(run, "heldout_records", None) or [])[: max(num_sequences, 0)]
        if records and getattr(run, "target", None) is not None:
            self.examples = tokenize_records(records, run.tokenizer, run.cfg.data.max_length, what="held-out")
        elif num_sequences > 0 and acc.is_main_process:
            log.warning("no held-out sequences to score at checkpoints: 'keep best' falls back to the newest")

    @torch.no_grad()
    def __call__(self, model) -> Optional[Dict[str, float]]:
        if not self.examples:
            return None
        from deepspec.losses import summarise
        from deepspec.training.loop import micro_step

        cfg = self.run.cfg
        was_training = model.training
        model.eval()
        sums: Dict[str, torch.Tensor] = {}
        m = cfg.train.micro_batch_size
        for start in range(0, len(self.examples), m):
            chunk = self.examples[start : start + m]
            keys = [(0, start + k) for k in range(len(chunk))]
            batch = collate(
                chunk,
                keys,
                cfg.data.num_anchors,
                cfg.train.seed + HELDOUT_ANCHOR_SEED_OFFSET,
                self.run.pad_id,
            ).to(self.acc.device)
            with bf16_autocast(self.acc, cfg.train.mixed_precision):
                feats = self.run.online_features(batch)  # never the cache: it holds training sequences
                out = micro_step(self.run, model, batch, torch.ones((), device=self.acc.device), feats)
            for k, v in out.sums.items():
                sums[k] = sums.get(k, 0) + v.float()
        model.train(was_training)
        s = summarise(sums, cfg.loss)
        return {"tau_est": s["tau_est"], "loss": s["loss"], "sequences": len(self.examples)}
