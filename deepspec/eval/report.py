"""What an evaluation writes: eval.json (JSON-safe), rounds.jsonl and the console table."""

from __future__ import annotations

import json
import math
from typing import Dict

from deepspec import atomic


def finite_or_none(obj):
    # NaN (e.g. τ over zero rounds) is not valid JSON; write null instead.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def write_rounds(path: str, runs) -> None:
    """One JSON line per recorded round, so a run can be re-analysed without decoding again."""
    with atomic.atomic_open(path) as f:
        for name, temp, run in runs:
            for i, rounds in enumerate(run.rounds_by_prompt):
                for r in rounds:
                    f.write(
                        json.dumps(
                            {
                                "dataset": name,
                                "temperature": temp,
                                "prompt": i,
                                "verified": r.verified,
                                "accepted": r.accepted,
                                "accept_mask": r.accept_mask,
                                "committed": r.committed,
                                "confidence_logits": r.confidence_logits,
                                "draft_time": r.draft_time,
                                "verify_time": r.verify_time,
                            }
                        )
                        + "\n"
                    )


def format_table(report: Dict) -> str:
    """Console summary: one row per dataset and temperature."""
    rows = [
        f"{'dataset':<16} {'T':>4} {'tau':>6} {'accept':>7} {'spec tok/s':>11} {'target tok/s':>13} "
        f"{'speedup':>8} {'ECE raw':>8} {'ECE STS':>8} {'AUC':>6} {'sched/fixed (R lo, hi)':>23}"
    ]
    datasets = report.get("datasets") or {"prompts": {"temperatures": report["temperatures"]}}
    for name, d in datasets.items():
        for s in d["temperatures"].values():
            conf = s.get("confidence") or {}
            sched = (s.get("scheduler") or {}).get("levels") or []
            ratio = (
                f"{sched[0]['scheduled_over_fixed']:.2f}x, {sched[-1]['scheduled_over_fixed']:.2f}x"
                if sched
                else "-"
            )
            rows.append(
                f"{name[:16]:<16} {s['temperature']:>4g} {_num(s['tau'], 6, 3)} {_num(s['acceptance_rate'], 7, 3)} "
                f"{_num(s['spec_tokens_per_s'], 11, 1)} {_num(s['target_tokens_per_s'], 13, 1)} "
                f"{_num(s['speedup'], 7, 2)}x {_pct(conf.get('mean_ece_before'))} {_pct(conf.get('mean_ece_after'))} "
                f"{_num(conf.get('mean_auc_after'), 6, 3)} {ratio:>23}"
            )
    return "\n".join(rows)


def _pct(x) -> str:
    return f"{100 * x:>7.2f}%" if x is not None else f"{'-':>8}"


def _num(x, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"
