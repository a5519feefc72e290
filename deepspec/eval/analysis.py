"""What the recorded rounds of one dataset at one temperature say about the confidence head.

Calibration (ECE/AUC/Brier before and after STS, fitted on one split of prompts and scored on the
other), the threshold sweep and the R-request scheduler simulation, all on the held-out split's
rounds with the STS-calibrated survival curves.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from deepspec.eval import calibration as cal
from deepspec.eval.replay import concurrency_sweep, threshold_sweep
from deepspec.eval.scheduler import SPSCurve


def analyze(
    rounds_by_prompt: Sequence[Sequence],
    cfg,
    sps: Optional[SPSCurve] = None,
    event: Optional[str] = None,
    stored_sts: Optional[Sequence[float]] = None,
) -> Dict:
    """JSON-ready dict with keys confidence / threshold_sweep / scheduler (each None when not run,
    with the reason under ``skipped``).

    ``event``: the acceptance event the recorded confidences predict ("greedy" or "sampling",
    reported). ``stored_sts``: the STS temperatures the drafter already carries for this decoding
    temperature; they are scored on the same held-out rounds (``stored``)."""
    out: Dict = {"confidence": None, "threshold_sweep": None, "scheduler": None}
    data = cal.from_rounds(rounds_by_prompt)
    if data is None:
        out["skipped"] = "the drafter has no confidence head"
        return out
    if not (cfg.calibration or (cfg.scheduler and sps is not None)):
        return out
    n_prompts = len(np.unique(data.prompt))
    if cfg.calibration and n_prompts >= 2:
        rep = cal.calibration_report(data, cfg.calibration_fraction, cfg.ece_bins, cfg.seed)
        _, test = cal.split_by_prompt(data, cfg.calibration_fraction, cfg.seed)
        temps = rep["sts_temperatures"]
        rep["event"] = event
        if stored_sts is not None:
            stored = cal.slot_metrics(test, list(stored_sts), cfg.ece_bins)
            rep["stored"] = {
                "sts_temperatures": list(stored_sts),
                "per_slot": stored,
                "mean_ece": cal._mean(stored, "ece"),
                "mean_auc": cal._mean(stored, "auc"),
            }
        out["confidence"] = rep
    else:
        if cfg.calibration:
            out["skipped"] = (
                f"calibration needs rounds from >= 2 prompts, got {n_prompts}; raw confidences used"
            )
        test, temps = data, None
    curves = cal.survival_estimates(test.logits, temps)
    thresholds = [float(t) for t in cfg.thresholds]
    if cfg.calibration:
        out["threshold_sweep"] = threshold_sweep(curves, test.accepted, thresholds)
    if cfg.scheduler and sps is not None:
        out["scheduler"] = concurrency_sweep(
            curves, test.accepted, sps, [int(r) for r in cfg.concurrency], thresholds, prompt=test.prompt
        )
        out["scheduler"]["calibrated"] = temps is not None
    return out
