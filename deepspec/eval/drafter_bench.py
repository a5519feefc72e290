"""Figures and tables of the drafter benchmark (scripts/bench_drafters.py, docs/benchmarks.md section 1).

A finished run folder is read into per-prompt acceptance counts; τ and every ratio get a 95 % bootstrap
interval over seeds and prompts (deepspec/eval/intervals.py), and "X beats Y" is written only where the
ratio's interval excludes 1.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from deepspec.eval import intervals

DRAFTERS = {  # name: (model group, drafter layers)
    "DSpark-2L": ("dspark", 2),
    "DFlash-2L": ("dflash", 2),
    "DFlash-5L": ("dflash", 5),
    "EAGLE-3-1L": ("eagle3", 1),
}
BASELINE = "DFlash-2L"
PAIRS = [("DSpark-2L", "EAGLE-3-1L")]  # compared besides everything vs the baseline
PRUNE_GOAL = 0.02  # docs/benchmarks.md: a pruned draft vocabulary may cost at most 2 % of τ
_PRUNED = re.compile(r"^(?P<base>.+)-d(?P<d>\d+)$")
_HEAVY = ("confidence", "threshold_sweep", "scheduler", "mean_confidence")


def drafter_spec(name: str):
    """``(model group, layers, draft vocabulary or None, full-vocabulary name)`` of a run name."""
    m = _PRUNED.match(name)
    base, d = (m["base"], int(m["d"])) if m and m["base"] in DRAFTERS else (name, None)
    if base not in DRAFTERS:
        raise SystemExit(
            f"unknown drafter {name!r}: expected one of {sorted(DRAFTERS)}, optionally + '-d<N>'"
        )
    return (*DRAFTERS[base], d, base)


def load_run(d: Path) -> Dict:
    """What the tables need from a finished run folder: its summary and per-prompt, per-slot counts."""
    ev = json.loads((d / "eval.json").read_text())
    summary = json.loads((d / "train_summary.json").read_text())
    info = json.loads((d / "run_info.json").read_text())
    records = [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines() if line.strip()]
    temps = {}
    for key, m in ev["temperatures"].items():
        recs = [r for r in records if float(r["temperature"]) == float(key)]
        gamma = ev["block_size"]
        reached = [
            sum(r["verified"] >= k and r["accepted"] >= k - 1 for r in recs) for k in range(1, gamma + 1)
        ]
        passed = [sum(r["verified"] >= k and r["accepted"] >= k for r in recs) for k in range(1, gamma + 1)]
        temps[key] = {k: v for k, v in m.items() if k not in _HEAVY} | {
            "counts": intervals.prompt_counts(recs, float(key), num_prompts=m["num_prompts"]),
            "slot_reached": reached,
            "slot_accepted": passed,
        }
    return {
        "dir": str(d),
        "trainable_params": info["trainable_params"],
        "train_steps": summary["train_steps"],
        "train_time_s": summary["train_time_s"],
        "block_size": ev["block_size"],
        "max_new_tokens": ev["max_new_tokens"],
        "temperatures": temps,
    }


# ----------------------------------------------------------------------------- figures from runs
def _seeds(*by_seed: Dict[int, Dict]) -> List[int]:
    return sorted(set.intersection(*(set(b) for b in by_seed)))


def tau_iv(by_seed: Dict[int, Dict], temp: str) -> intervals.Interval:
    return intervals.tau_interval([by_seed[s]["temperatures"][temp]["counts"] for s in sorted(by_seed)])


def ratio_iv(a: Dict[int, Dict], b: Dict[int, Dict], temp: str) -> Optional[intervals.Interval]:
    """τ_a / τ_b over the seeds both ran, paired by seed and prompt."""
    seeds = _seeds(a, b)
    if not seeds:
        return None
    return intervals.tau_ratio_interval(
        [a[s]["temperatures"][temp]["counts"] for s in seeds],
        [b[s]["temperatures"][temp]["counts"] for s in seeds],
    )


def verdict(a: str, b: str, iv: intervals.Interval) -> str:
    if iv.low > 1:
        return f"{a} beats {b}"
    if iv.high < 1:
        return f"{b} beats {a}"
    return "within noise"


def comparisons(runs: Dict[int, Dict[str, Dict[int, Dict]]]) -> List[Dict]:
    """Every ratio the report states, with its interval and verdict: each drafter vs the baseline,
    the fixed pairs, and each pruned drafter vs its full-vocabulary run."""
    out = []
    for gamma, by_name in sorted(runs.items()):
        todo = []
        for name in by_name:
            full = drafter_spec(name)[3]
            if full != name:
                todo.append((name, full, "pruning"))
            elif name != BASELINE:
                todo.append((name, BASELINE, "vs baseline"))
        todo += [(a, b, "pair") for a, b in PAIRS]
        for a, b, kind in todo:
            if a not in by_name or b not in by_name:
                continue
            for temp in next(iter(by_name[a].values()))["temperatures"]:
                iv = ratio_iv(by_name[a], by_name[b], temp)
                if iv is None:
                    continue
                row = {"gamma": gamma, "temperature": float(temp), "a": a, "b": b, "kind": kind}
                row |= {"ratio": iv.to_dict(), "verdict": verdict(a, b, iv)}
                if kind == "pruning":
                    row["cost"] = {"value": 1 - iv.value, "low": 1 - iv.high, "high": 1 - iv.low}
                    row["goal"] = prune_goal_text(iv)
                out.append(row)
    return out


def prune_goal_text(iv: intervals.Interval) -> str:
    if 1 - iv.low <= PRUNE_GOAL:
        return f"met: the whole interval costs ≤ {PRUNE_GOAL:.0%}"
    if 1 - iv.value <= PRUNE_GOAL:
        return f"point estimate within {PRUNE_GOAL:.0%}, but the interval reaches {1 - iv.low:.1%}"
    return f"missed: costs {1 - iv.value:.1%} (interval {1 - iv.high:.1%} to {1 - iv.low:.1%})"


def gain_growth(runs, a: str = "DSpark-2L", b: str = BASELINE) -> List[Dict]:
    """Does a's gain over b grow with γ? (τ_a/τ_b at the largest γ) / (at the smallest), paired: every
    run of one seed saw the same prompts at every γ."""
    gs = sorted(g for g in runs if a in runs[g] and b in runs[g])
    if len(gs) < 2:
        return []
    lo, hi = gs[0], gs[-1]
    sides = [runs[hi][a], runs[hi][b], runs[lo][a], runs[lo][b]]
    seeds = _seeds(*sides)
    out = []
    for temp in next(iter(runs[lo][a].values()))["temperatures"]:
        iv = intervals.gain_ratio_interval(
            *([side[s]["temperatures"][temp]["counts"] for s in seeds] for side in sides)
        )
        if iv.low > 1:
            text = f"the gain grows from γ={lo} to γ={hi}"
        elif iv.high < 1:
            text = f"the gain shrinks from γ={lo} to γ={hi}"
        else:
            text = "within noise"
        row = {"a": a, "b": b, "gammas": [lo, hi], "temperature": float(temp)}
        out.append(row | {"ratio": iv.to_dict(), "verdict": text})
    return out


# ----------------------------------------------------------------------------- tables
def interval_text(d: Dict, digits: int = 3) -> str:
    """An interval's dict (Interval.to_dict) as the tables print it: ``value [low, high]``."""
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def tau_table(runs) -> List[str]:
    rows = [
        "| γ | drafter | T | τ [95 %] | seeds × prompts | accept rate | T=0 identical | draft ms/round | "
        "trainable params | train s (mean) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for gamma, by_name in sorted(runs.items()):
        for name, by_seed in by_name.items():
            seeds = sorted(by_seed)
            any_run = by_seed[seeds[0]]
            # a run resumed only to evaluate again records no training time
            times = [by_seed[s]["train_time_s"] for s in seeds if by_seed[s]["train_time_s"] is not None]
            train_s = f"{sum(times) / len(times):.0f}" if times else "-"
            for temp in any_run["temperatures"]:
                ms = [by_seed[s]["temperatures"][temp] for s in seeds]
                iv = tau_iv(by_seed, temp)
                acc = sum(m["accepted"] for m in ms) / max(1, sum(m["proposed"] for m in ms))
                draft_ms = 1000 * sum(m["draft_time_s"] for m in ms) / max(1, sum(m["rounds"] for m in ms))
                same = (
                    f"{sum(m.get('identical_outputs') or 0 for m in ms)}/{sum(m['num_prompts'] for m in ms)}"
                    if float(temp) == 0 and all(m.get("identical_outputs") is not None for m in ms)
                    else "-"
                )
                rows.append(
                    f"| {gamma} | {name} | {float(temp):g} | {iv.fmt()} | {iv.seeds} × {iv.prompts} | {acc:.3f} | "
                    f"{same} | {draft_ms:.1f} | {any_run['trainable_params']:,} | {train_s} |"
                )
    return rows


def ratio_table(comps: List[Dict], growth: List[Dict]) -> List[str]:
    rows = ["| γ | T | τ ratio | value [95 %] | seeds | verdict |", "| --- | --- | --- | --- | --- | --- |"]
    for c in comps:
        if c["kind"] != "pruning":
            r = c["ratio"]
            rows.append(
                f"| {c['gamma']} | {c['temperature']:g} | {c['a']} / {c['b']} | {interval_text(r)} | {r['seeds']} | "
                f"{c['verdict']} |"
            )
    for g in growth:
        r = g["ratio"]
        rows.append(
            f"| {g['gammas'][1]} vs {g['gammas'][0]} | {g['temperature']:g} | ({g['a']} / {g['b']}) at γ="
            f"{g['gammas'][1]} over γ={g['gammas'][0]} | {interval_text(r)} | {r['seeds']} | {g['verdict']} |"
        )
    return rows


def prune_table(comps: List[Dict]) -> List[str]:
    rows = [
        "| γ | T | drafter | τ / full vocabulary [95 %] | τ cost [95 %] | seeds | goal ≤ 2 % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in comps:
        if c["kind"] == "pruning":
            k = c["cost"]
            rows.append(
                f"| {c['gamma']} | {c['temperature']:g} | {c['a']} | {interval_text(c['ratio'])} | {100 * k['value']:+.1f} % "
                f"[{100 * k['low']:+.1f}, {100 * k['high']:+.1f}] | {c['ratio']['seeds']} | {c['goal']} |"
            )
    return rows if len(rows) > 2 else []


def slot_table(runs) -> List[str]:
    rows = [
        "| γ | drafter | T | conditional acceptance, slot 1..γ (pooled over seeds) | rounds reaching slot 1 … γ |",
        "| --- | --- | --- | --- | --- |",
    ]
    for gamma, by_name in sorted(runs.items()):
        for name, by_seed in by_name.items():
            for temp in next(iter(by_seed.values()))["temperatures"]:
                ms = [r["temperatures"][temp] for r in by_seed.values()]
                reached = [sum(x) for x in zip(*(m["slot_reached"] for m in ms))]
                passed = [sum(x) for x in zip(*(m["slot_accepted"] for m in ms))]
                cond = " ".join(f"{p / n:.2f}" if n else "-" for p, n in zip(passed, reached))
                rows.append(f"| {gamma} | {name} | {float(temp):g} | {cond} | {reached[0]} … {reached[-1]} |")
    return rows


def report(args, runs, wall_s: float) -> Dict:
    comps = comparisons(runs)
    growth = gain_growth(runs)
    any_run = next(iter(next(iter(next(iter(runs.values())).values())).values()))
    first_temp = next(iter(any_run["temperatures"].values()))
    rep = {
        "command": "PYTHONPATH=. python scripts/bench_drafters.py " + " ".join(args.argv),
        "machine": machine(),
        "threads_per_run": args.threads,
        "wall_s": wall_s,
        "seeds": args.seeds,
        "prompts_per_seed": first_temp["num_prompts"],
        "train_steps": any_run["train_steps"],
        "max_new_tokens": any_run["max_new_tokens"],
        "runs": {
            str(g): {n: {str(s): r for s, r in bs.items()} for n, bs in bn.items()} for g, bn in runs.items()
        },
        "comparisons": comps,
        "gain_growth": growth,
    }
    lines = [
        f"# Drafter benchmark (recipe={args.recipe})",
        "",
        f"Command: `{rep['command']}`",
        "",
        f"Machine: {rep['machine']}; {args.threads} torch thread(s) per run. {args.seeds} seed(s) (training seed and "
        f"prompt sample), {rep['prompts_per_seed']} held-out prompts per seed, {rep['train_steps']} optimizer steps "
        f"per run, ≤ {rep['max_new_tokens']} new tokens. Intervals: 95 % bootstrap over seeds and prompts, paired "
        "for ratios (docs/benchmarks.md, Intervals). Train seconds and draft ms are wall clock on that machine.",
        "",
        *tau_table(runs),
        "",
        *ratio_table(comps, growth),
        "",
    ]
    pt = prune_table(comps)
    if pt:
        lines += ["Draft-vocabulary pruning (τ cost = 1 − τ_pruned / τ_full):", "", *pt, ""]
    lines += ["Per-slot acceptance (point estimates; the last column is each slot's sample size):", ""]
    lines += slot_table(runs)
    rep["markdown"] = "\n".join(lines) + "\n"
    return rep


def machine() -> str:
    import torch

    from deepspec.machine import cpu_name

    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU only ({cpu_name()}, {os.cpu_count()} cores)"
    )
    return f"{dev}, torch {torch.__version__}"
