#!/usr/bin/env python
"""vLLM-fed cache vs HF-fed cache: the features, and the drafters trained from them.

    python scripts/bench_vllm_features.py [--out outputs/bench_vllm_features] [--report-only] [hydra overrides ...]

Collects the same data twice (deepspec/collect.py with collect.backend=hf and =vllm; bf16), reports
how far the stored features differ, trains one drafter from each cache (same seed, same overrides),
and compares their held-out τ at every eval temperature with 95 % intervals that treat prompts as
clusters (deepspec/engine/stats.py). At T=0 both drafters decode the same prompts to the same target
text, so the difference is paired per prompt; at T>0 the two margins combine. Overrides apply to
every stage (collect and train). Writes <out>/bench_vllm_features.{json,md}; finished caches are
reused (collect resumes). --report-only makes the tables from finished caches and runs (e.g. when
the two trainings were run side by side by hand with the logged commands).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sh(args, log: Path) -> float:
    print("+", " ".join(str(a) for a in args), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run(
            [sys.executable, *map(str, args)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if res.returncode != 0:
        sys.exit(f"failed (exit {res.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.time() - t0


def feature_diff(a_dir: Path, b_dir: Path) -> dict:
    from deepspec.data.cache import CacheReader

    a, b = CacheReader(a_dir), CacheReader(b_dir)
    if a.token_data() != b.token_data():
        sys.exit(f"{a_dir} and {b_dir} hold different token ids")
    out = {}
    for key in ("aux", "final"):
        worst, differ, total = 0.0, 0, 0
        for i in range(len(a.token_data())):
            x, y = getattr(a.load(i), key).float(), getattr(b.load(i), key).float()
            d = (x - y).abs()
            worst, differ, total = max(worst, d.max().item()), differ + int((d > 0).sum()), total + d.numel()
        out[key] = {"max_abs_diff": worst, "share_differing": differ / total}
    return out


def per_prompt(run_dir: Path):
    """{temperature: [PromptCounts per prompt]} from the run's rounds.jsonl."""
    from deepspec.engine.stats import PromptCounts

    acc = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for line in open(run_dir / "rounds.jsonl"):
        r = json.loads(line)
        c = acc[float(r["temperature"])][r["prompt"]]
        c[0] += 1
        c[1] += int(r["accepted"])
    return {t: [PromptCounts(*p[i]) for i in sorted(p)] for t, p in acc.items()}


def main(argv) -> None:
    from deepspec.engine import stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench_vllm_features")
    ap.add_argument("--report-only", action="store_true", help="no collection or training")
    args, common = ap.parse_known_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    wall, counts = {}, {}
    for backend in () if args.report_only else ("hf", "vllm"):
        cache = out / f"cache-{backend}"
        wall[f"collect-{backend}"] = sh(
            [
                ROOT / "deepspec" / "collect.py",
                *common,
                f"collect.cache_dir={cache}",
                f"collect.backend={backend}",
            ],
            out / f"collect-{backend}.log",
        )
    diff = feature_diff(out / "cache-hf", out / "cache-vllm")
    for backend in ("hf", "vllm"):
        run_dir = out / f"train-{backend}"
        if args.report_only:
            counts[backend] = per_prompt(run_dir)
            continue
        wall[f"train-{backend}"] = sh(
            [
                ROOT / "deepspec" / "train.py",
                *common,
                "data.source=cache",
                f"data.cache_dir={out / f'cache-{backend}'}",
                f"train.output_dir={run_dir}",
                "train.progress_bar=false",
                "export.after_training=false",
            ],
            out / f"train-{backend}.log",
        )
        counts[backend] = per_prompt(run_dir)
    rows = [
        "| feature | max abs diff (bf16 cache, vLLM vs HF) | share of stored values that differ |",
        "| --- | --- | --- |",
    ]
    rows += [f"| {k} | {v['max_abs_diff']:.3g} | {v['share_differing']:.2e} |" for k, v in diff.items()]
    rows += [
        "",
        "| T | τ from HF cache [95 % CI] | τ from vLLM cache [95 % CI] | difference | 95 % margin | within |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    taus = {}
    for t in sorted(counts["hf"]):
        h, v = counts["hf"][t], counts["vllm"][t]
        sh_, sv = stats.summary(h, 1), stats.summary(v, 1)  # τ only (no per-position counts)
        margin = stats.paired_margin(v, h) if t == 0 else stats.independent_margin(sv, sh_)
        d = sv["tau"] - sh_["tau"]
        taus[t] = {"hf": sh_, "vllm": sv, "difference": d, "margin95": margin, "within": abs(d) <= margin}
        rows.append(
            f"| {t:g} | {sh_['tau']:.3f} [{sh_['tau_ci95'][0]:.3f}, {sh_['tau_ci95'][1]:.3f}] | "
            f"{sv['tau']:.3f} [{sv['tau_ci95'][0]:.3f}, {sv['tau_ci95'][1]:.3f}] | {d:+.3f} | {margin:.3f} | "
            f"{'yes' if abs(d) <= margin else 'NO'} |"
        )
    rows.append("")
    rows.append("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    table = "\n".join(rows)
    print(table)
    report = {
        "features": diff,
        "tau": {str(t): v for t, v in taus.items()},
        "wall_s": wall,
        "overrides": common,
    }
    (out / "bench_vllm_features.json").write_text(json.dumps(report, indent=2))
    (out / "bench_vllm_features.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
