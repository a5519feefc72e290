"""The export checker's logits check: the exported drafter, loaded as an engine would load it, must
reproduce the trained drafter's outputs on a fixed input (a reference drafter, or the probe written
into ``deepspec_export.json`` with the export), within the tolerance of the export's dtype."""

from __future__ import annotations

from typing import Optional

import torch

from deepspec.exporting.formats import EMBED_KEYS
from deepspec.exporting.io import WEIGHTS_NAME, ExportInputError, tensor_header
from deepspec.exporting.target_info import TargetInfo
from deepspec.exporting.writer import SIDECAR_NAME, drafter_outputs, load_export, probe_ids, tolerance
from deepspec.models import Drafter


def check_logits(rep, c, sidecar, reference: Optional[Drafter], tgt: Optional[TargetInfo]) -> None:
    if reference is None and (sidecar is None or "probe" not in sidecar):
        rep.warnings.append("logits not checked: no reference drafter and no probe in " + SIDECAR_NAME)
        return
    embed = lm_head = None
    if tgt is not None:
        embed, lm_head = tgt.embed, tgt.lm_head
    try:
        loaded = load_export(rep.root, target_embed=embed, target_lm_head=lm_head)
    except ExportInputError as e:
        if embed is None:
            rep.warnings.append(f"logits not checked: {e}")
        else:
            rep.errors.append(str(e))
        return
    got, got_conf = drafter_outputs(loaded)
    dtype = (sidecar or {}).get("dtype") or "bfloat16"
    if reference is not None:
        ref, ref_conf = drafter_outputs(reference)
        what = "the reference drafter"
    else:
        pr = sidecar["probe"]
        ids = torch.tensor(pr["vocab_ids"])
        if ids.max().item() >= got.shape[-1] or ids.tolist() != probe_ids(got.shape[-1]).tolist():
            rep.errors.append(f"{SIDECAR_NAME}: the logits probe does not fit vocab_size={got.shape[-1]}")
            return
        got = torch.cat([got[..., ids], torch.logsumexp(got, -1, keepdim=True)], -1)
        ref = torch.cat([torch.tensor(pr["logits"]), torch.tensor(pr["logsumexp"]).unsqueeze(-1)], -1)
        ref_conf = torch.tensor(pr["confidence_logits"]) if pr.get("confidence_logits") is not None else None
        what = f"the original drafter's probe in {SIDECAR_NAME}"
    # Scale from the logits themselves: log-partitions sit near ln V and would loosen the bound.
    scale = (ref[..., :-1] if reference is None else ref).abs().max().item()
    if got.shape != ref.shape:
        rep.errors.append(f"logits shape {list(got.shape)} differs from {what} {list(ref.shape)}")
        return
    diff = (got - ref).abs().max().item()
    if ref_conf is not None and got_conf is not None:
        if got_conf.shape != ref_conf.shape:  # e.g. the greedy confidence output in one of them only
            rep.errors.append(
                f"confidence logits shape {list(got_conf.shape)} differs from {what} {list(ref_conf.shape)}"
            )
            return
        diff = max(diff, (got_conf - ref_conf).abs().max().item())
    elif (ref_conf is None) != (got_conf is None):
        rep.errors.append(f"confidence head present in {'export' if got_conf is not None else what} only")
        return
    tol = tolerance(dtype, scale)
    if diff > tol:
        from_target = embed is not None and not any(
            k in tensor_header(rep.root / WEIGHTS_NAME) for k in EMBED_KEYS
        )
        hint = (
            " (embedding/lm_head came from the target: is it the model this drafter was trained on?)"
            if from_target
            else ""
        )
        rep.errors.append(
            f"logits differ from {what} on the fixed input: max |Δ|={diff:.3g} > {tol:.3g} "
            f"allowed for {dtype}{hint}"
        )
    else:
        rep.passed.append(f"logits reproduce {what} (max |Δ|={diff:.2g} ≤ {tol:.2g}, {dtype})")
