"""Drafter benchmark: DSpark vs DFlash vs EAGLE-3 on one target, same data, steps and held-out prompts.

    PYTHONPATH=. python scripts/bench_drafters.py                          # recipe=tiny defaults
    PYTHONPATH=. python scripts/bench_drafters.py --steps 200 --prompts 12 -- target.tiny.cache_dir=/path
    PYTHONPATH=. python scripts/bench_drafters.py --only sweep --gammas 4,8,12,16

Trains (deepspec/train.py in a subprocess each, so every run is an ordinary run folder):

* main table: DSpark-2L, DFlash-2L, DFlash-5L, EAGLE-3-1L at the recipe's block size (γ = 7);
* block-size sweep: DSpark-2L and DFlash-2L at each γ in ``--gammas``.

Every run uses the same recipe, seed, data order, global batch and number of optimizer steps, and is
evaluated by the same evaluator (docs/method.md, Evaluation protocol: chain drafting, batch 1, full block) on the same held-out
prompts at T=0 and T=1. Arguments after ``--`` are Hydra overrides applied to every run.

Writes ``<out>/bench_drafters.json`` (everything, including each run's eval.json) and
``<out>/bench_drafters.md`` (the tables), and prints the tables. ``--reuse`` keeps finished runs
(a run folder with eval.json and train_summary.json), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

MAIN_RUNS = [
    # name, model group, drafter layers
    ("DSpark-2L", "dspark", 2),
    ("DFlash-2L", "dflash", 2),
    ("DFlash-5L", "dflash", 5),
    ("EAGLE-3-1L", "eagle3", 1),
]
SWEEP_KINDS = [("DSpark-2L", "dspark", 2), ("DFlash-2L", "dflash", 2)]


def parse(argv: Optional[List[str]] = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        description="Train and evaluate DSpark / DFlash / EAGLE-3 drafters side by side."
    )
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    ap.add_argument(
        "--sweep-steps", type=int, default=None, help="steps for the γ sweep runs (default: --steps)"
    )
    ap.add_argument(
        "--prompts", type=int, default=None, help="held-out prompts per evaluation (default: recipe's)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--gammas", default="4,8,12,16", help="block sizes of the sweep")
    ap.add_argument("--only", choices=["all", "main", "sweep"], default="all")
    ap.add_argument("--runs", default=None, help="comma-separated subset of the main-table names")
    ap.add_argument("--out", default="outputs/bench_drafters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")
    ap.add_argument("--recipe", default="tiny")
    args = ap.parse_args(argv)
    args.overrides = overrides
    return args


def run_overrides(args, kind: str, layers: int, gamma: Optional[int], steps: Optional[int]) -> List[str]:
    o = [
        f"recipe={args.recipe}",
        f"model={kind}",
        f"model.num_layers={layers}",
        "train.progress_bar=false",
        "export.after_training=false",
    ]
    if gamma is not None:
        o.append(f"model.block_size={gamma}")
    if steps is not None:
        o.append(f"train.max_steps={steps}")
    if args.prompts is not None:
        o.append(f"eval.num_prompts={args.prompts}")
    if args.max_new_tokens is not None:
        o.append(f"eval.max_new_tokens={args.max_new_tokens}")
    return o + list(args.overrides)


def train_and_eval(name: str, out: Path, overrides: List[str], threads: int, reuse: bool) -> Dict:
    done = (out / "eval.json").is_file() and (out / "train_summary.json").is_file()
    if not (reuse and done):
        cmd = [sys.executable, str(ROOT / "deepspec" / "train.py"), f"train.output_dir={out}", *overrides]
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(threads),
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )
        out.mkdir(parents=True, exist_ok=True)
        print(f"[{name}] " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        with open(out / "bench.log", "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        if proc.returncode != 0:
            tail = (out / "bench.log").read_text()[-3000:]
            raise RuntimeError(
                f"run {name} failed (exit {proc.returncode}); log {out / 'bench.log'}:\n{tail}"
            )
        print(f"[{name}] done in {time.time() - t0:.0f}s", flush=True)
    summary = json.loads((out / "train_summary.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    return {
        "name": name,
        "dir": str(out),
        "overrides": overrides,
        "trainable_params": info["trainable_params"],
        "target_layer_ids": info["drafter"]["target_layer_ids"],
        "train_steps": summary["train_steps"],
        "train_time_s": summary["train_time_s"],
        "final_metrics": summary.get("final_metrics", {}),
        "eval": json.loads((out / "eval.json").read_text()),
    }


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main_table(results: Dict[str, Dict]) -> List[str]:
    rows = [
        "| drafter | trainable params | train s | T | τ | accept rate | τ vs DFlash-2L | draft ms/round | "
        "conditional acceptance, slot 1..γ |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = results.get("DFlash-2L")
    for name, r in results.items():
        for temp, m in r["eval"]["temperatures"].items():
            cond = " ".join(_fmt(a, 2) for a in m["conditional_acceptance"])
            rel = "-"
            if base is not None and m["tau"] is not None and base["eval"]["temperatures"][temp]["tau"]:
                rel = f"{(m['tau'] / base['eval']['temperatures'][temp]['tau'] - 1) * 100:+.1f}%"
            draft_ms = 1000 * m["draft_time_s"] / m["rounds"] if m.get("rounds") else None
            rows.append(
                f"| {name} | {r['trainable_params']:,} | {r['train_time_s']:.0f} | {float(temp):g} | "
                f"{_fmt(m['tau'])} | {_fmt(m['acceptance_rate'])} | {rel} | {_fmt(draft_ms, 1)} | {cond} |"
            )
    return rows


def sweep_table(sweep: Dict[int, Dict[str, Dict]]) -> List[str]:
    rows = ["| γ | T | DSpark-2L τ | DFlash-2L τ | DSpark gain |", "| --- | --- | --- | --- | --- |"]
    for gamma in sorted(sweep):
        pair = sweep[gamma]
        if "DSpark-2L" not in pair or "DFlash-2L" not in pair:
            continue
        for temp in pair["DSpark-2L"]["eval"]["temperatures"]:
            a = pair["DSpark-2L"]["eval"]["temperatures"][temp]["tau"]
            b = pair["DFlash-2L"]["eval"]["temperatures"][temp]["tau"]
            gain = f"{(a / b - 1) * 100:+.1f}%" if a and b else "-"
            rows.append(f"| {gamma} | {float(temp):g} | {_fmt(a)} | {_fmt(b)} | {gain} |")
    return rows


def verdicts(results: Dict[str, Dict], sweep: Dict[int, Dict[str, Dict]]) -> Dict:
    """The acceptance questions, answered from the numbers (no judgement beyond the comparison)."""
    v: Dict = {}
    if "DSpark-2L" in results and "DFlash-2L" in results:
        for temp, m in results["DSpark-2L"]["eval"]["temperatures"].items():
            b = results["DFlash-2L"]["eval"]["temperatures"][temp]["tau"]
            v[f"dspark2_beats_dflash2_T{float(temp):g}"] = bool(m["tau"] and b and m["tau"] > b)
    if results:
        for temp in next(iter(results.values()))["eval"]["temperatures"]:
            order = sorted(results, key=lambda n: -(results[n]["eval"]["temperatures"][temp]["tau"] or 0))
            v[f"order_by_tau_T{float(temp):g}"] = order
    gains: Dict[str, List] = {}
    for gamma in sorted(sweep):
        pair = sweep[gamma]
        if "DSpark-2L" in pair and "DFlash-2L" in pair:
            for temp in pair["DSpark-2L"]["eval"]["temperatures"]:
                a = pair["DSpark-2L"]["eval"]["temperatures"][temp]["tau"]
                b = pair["DFlash-2L"]["eval"]["temperatures"][temp]["tau"]
                gains.setdefault(f"T{float(temp):g}", []).append(
                    (gamma, (a / b - 1) * 100 if a and b else None)
                )
    for t, g in gains.items():
        vals = [x for _, x in g if x is not None]
        v[f"gain_by_gamma_{t}"] = g
        v[f"gain_grows_with_gamma_{t}"] = bool(len(vals) > 1 and all(b > a for a, b in zip(vals, vals[1:])))
        v[f"gain_largest_gamma_above_smallest_{t}"] = bool(len(vals) > 1 and vals[-1] > vals[0])
    return v


def machine() -> str:
    import torch

    from deepspec.machine import cpu_name

    cpu = cpu_name()
    dev = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU only ({cpu}, {os.cpu_count()} cores)"
    )
    return f"{dev}, torch {torch.__version__}"


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []  # (table key, name, dir, overrides)
    if args.only in ("all", "main"):
        wanted = set(args.runs.split(",")) if args.runs else None
        for name, kind, layers in MAIN_RUNS:
            if wanted is None or name in wanted:
                jobs.append(
                    ("main", name, out / "main" / name, run_overrides(args, kind, layers, None, args.steps))
                )
    if args.only in ("all", "sweep"):
        steps = args.sweep_steps if args.sweep_steps is not None else args.steps
        for gamma in [int(g) for g in args.gammas.split(",") if g]:
            for name, kind, layers in SWEEP_KINDS:
                jobs.append(
                    (
                        gamma,
                        name,
                        out / "sweep" / f"gamma{gamma}" / name,
                        run_overrides(args, kind, layers, gamma, steps),
                    )
                )
    t0 = time.time()

    def work(job):
        key, name, d, o = job
        return (
            key,
            name,
            train_and_eval(
                f"{name}" + (f" γ={key}" if key != "main" else ""), d, o, args.threads, args.reuse
            ),
        )

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(work, jobs))
    results: Dict[str, Dict] = {}
    sweep: Dict[int, Dict[str, Dict]] = {}
    for key, name, r in done:
        if key == "main":
            results[name] = r
        else:
            sweep.setdefault(key, {})[name] = r
    report = {
        "machine": machine(),
        "threads_per_run": args.threads,
        "wall_s": time.time() - t0,
        "args": {k: v for k, v in vars(args).items()},
        "main": results,
        "sweep": {str(k): v for k, v in sweep.items()},
        "verdicts": verdicts(results, sweep),
    }
    lines = [
        f"# Drafter benchmark (recipe={args.recipe})",
        "",
        f"Machine: {report['machine']}; {args.threads} torch thread(s) per run. Train seconds are wall "
        "clock of the training loop on that machine.",
        "",
    ]
    if results:
        any_run = next(iter(results.values()))
        ev = any_run["eval"]
        lines += [
            f"Main table: γ = {ev['block_size']}, {any_run['train_steps']} optimizer steps each, "
            f"{ev['num_prompts']} held-out prompts, ≤ {ev['max_new_tokens']} new tokens, T = 0 and 1.",
            "",
        ]
        lines += main_table(results) + [""]
    if sweep:
        st = next(iter(next(iter(sweep.values())).values()))["train_steps"]
        lines += [f"Block-size sweep ({st} steps each):", ""] + sweep_table(sweep) + [""]
    lines += ["Verdicts: " + json.dumps(report["verdicts"])]
    table = "\n".join(lines)
    print(table)
    (out / "bench_drafters.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench_drafters.md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
