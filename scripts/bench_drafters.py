"""Drafter benchmark: DSpark vs DFlash vs EAGLE-3 on one target, over several seeds, with 95 % intervals.

    PYTHONPATH=. python scripts/bench_drafters.py                          # recipe=tiny, 3 seeds, γ = 7 and 15
    PYTHONPATH=. python scripts/bench_drafters.py --seeds 3 --prompts 32 --jobs 2 --reuse
    PYTHONPATH=. python scripts/bench_drafters.py --gammas 7 --runs DSpark-2L,DSpark-2L-d1024 -- train.lr=5e-4

Trains (deepspec/train.py in a subprocess each, so every run is an ordinary run folder) every drafter
of ``--runs`` at every block size of ``--gammas`` (``--sweep-runs`` narrows the drafters trained at the
block sizes after the first), once per seed. Seed s sets ``train.seed`` and ``eval.seed`` and draws the
held-out prompts with it (``eval.sample_heldout``): every drafter of one seed is evaluated on the same
prompts, so comparisons are paired, and the next seed brings other prompts and another initialisation.
A name ``<drafter>-d<N>`` (``DSpark-2L-d1024``) is that drafter with ``model.draft_vocab_size=N``,
compared with its full-vocabulary run.

τ and every ratio of τ carry a 95 % bootstrap interval over seeds and prompts
(deepspec/eval/intervals.py; docs/benchmarks.md, Intervals). "X beats Y" is written only where the
interval of τ_X / τ_Y excludes 1; otherwise "within noise".

Writes ``<out>/bench_drafters.json`` and ``<out>/bench_drafters.md`` and prints the tables.
``--reuse`` keeps finished runs (a run folder with eval.json and train_summary.json), so an
interrupted benchmark resumes. Arguments after ``--`` are Hydra overrides applied to every run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

from deepspec import atomic
from deepspec.entrypoint import split_overrides
from deepspec.eval.drafter_bench import DRAFTERS, drafter_spec, load_run, report

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: Optional[List[str]] = None):
    argv, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(description="Train and evaluate drafters side by side over seeds.")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (training seed and prompt sample)")
    ap.add_argument("--gammas", default="7,15", help="block sizes; the first is the main table's")
    ap.add_argument("--runs", default=",".join(DRAFTERS), help="drafters trained at every γ")
    ap.add_argument("--sweep-runs", default=None, help="drafters trained at the later γ (default: --runs)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the recipe's)")
    ap.add_argument("--prompts", type=int, default=None, help="held-out prompts per seed (default: recipe's)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--out", default="outputs/bench_drafters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs found in --out")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: tables from the planned runs already finished in --out, the rest listed as missing",
    )
    ap.add_argument("--recipe", default="tiny")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: need at least 1")
    args.gamma_list = [int(g) for g in args.gammas.split(",") if g]
    if not args.gamma_list:
        ap.error("--gammas: give at least one block size")
    args.run_list = [n for n in args.runs.split(",") if n]
    args.sweep_list = [n for n in args.sweep_runs.split(",") if n] if args.sweep_runs else args.run_list
    for n in args.run_list + args.sweep_list:
        drafter_spec(n)
    args.overrides = overrides
    args.argv = argv + (["--", *overrides] if overrides else [])
    return args


def run_overrides(args, name: str, gamma: int, seed: int) -> List[str]:
    kind, layers, draft_vocab, _ = drafter_spec(name)
    o = [
        f"recipe={args.recipe}",
        f"model={kind}",
        f"model.num_layers={layers}",
        f"model.block_size={gamma}",
        f"train.seed={seed}",
        f"eval.seed={seed}",
        "eval.sample_heldout=true",
        "eval.scheduler=false",  # the scheduler's SPS profile is not used here and costs minutes
        "eval.plots=false",
        "train.progress_bar=false",
        "export.after_training=false",
    ]
    if draft_vocab is not None:
        o.append(f"model.draft_vocab_size={draft_vocab}")
    if args.steps is not None:
        o.append(f"train.max_steps={args.steps}")
    if args.prompts is not None:
        o.append(f"eval.num_prompts={args.prompts}")
    if args.max_new_tokens is not None:
        o.append(f"eval.max_new_tokens={args.max_new_tokens}")
    return o + list(args.overrides)


def plan(args) -> List[tuple]:
    """``(seed, γ, name, run folder, overrides)`` of every run, seed-major so early seeds finish first."""
    jobs = []
    for seed in range(args.seeds):
        for i, gamma in enumerate(args.gamma_list):
            for name in args.run_list if i == 0 else args.sweep_list:
                d = Path(args.out) / f"seed{seed}" / f"gamma{gamma}" / name
                jobs.append((seed, gamma, name, d, run_overrides(args, name, gamma, seed)))
    return jobs


def finished(d: Path) -> bool:
    return (d / "eval.json").is_file() and (d / "train_summary.json").is_file()


def train(label: str, out: Path, overrides: List[str], threads: int, reuse: bool) -> None:
    if reuse and finished(out):
        return
    cmd = [sys.executable, str(ROOT / "deepspec" / "train.py"), f"train.output_dir={out}", *overrides]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{label}] " + " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(out / "bench.log", "w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = (out / "bench.log").read_text()[-3000:]
        raise RuntimeError(f"run {label} failed (exit {proc.returncode}); log {out / 'bench.log'}:\n{tail}")
    print(f"[{label}] done in {time.time() - t0:.0f}s", flush=True)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(args)
    t0 = time.time()

    def work(job):
        seed, gamma, name, d, o = job
        train(f"{name} γ={gamma} seed {seed}", d, o, args.threads, args.reuse)

    if not args.report_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(work, jobs))
    runs: Dict[int, Dict[str, Dict[int, Dict]]] = {}
    missing = []
    for seed, gamma, name, d, _ in jobs:
        if finished(d):
            runs.setdefault(gamma, {}).setdefault(name, {})[seed] = load_run(d)
        else:
            missing.append(f"{name} γ={gamma} seed {seed}")
    if not runs:
        raise SystemExit(
            f"--report-only: no finished run in {out} (a run folder holds eval.json and train_summary.json)"
        )
    rep = report(args, runs, time.time() - t0)
    if missing:
        rep["missing_runs"] = missing
        rep["markdown"] += "\nNot run, so absent from the tables: " + ", ".join(missing) + ".\n"
    print(rep["markdown"])
    atomic.write_json(out / "bench_drafters.json", {k: v for k, v in rep.items() if k != "markdown"})
    atomic.write_text(out / "bench_drafters.md", rep["markdown"])
    return rep


if __name__ == "__main__":
    main()
