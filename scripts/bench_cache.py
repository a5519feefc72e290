#!/usr/bin/env python
"""Offline cache benchmark: bytes/token of the bf16 and fp8 caches next to the reference layout's
6 + 2·H·(n+1), and τ of drafters trained from each (same data, steps and seed), with an online run
as the control (its difference to bf16 is the run-to-run noise floor).

    python scripts/bench_cache.py [--out outputs/bench_cache] [--skip-online] [hydra overrides ...]

Overrides apply to every stage (collect and train), e.g. the target and the schedule:

    python scripts/bench_cache.py train.max_steps=300 eval.num_prompts=32
    python scripts/bench_cache.py --preset small          # a small tiny target that builds in minutes

Writes <out>/bench_cache.json and <out>/bench_cache.md and prints the table. Each stage is a
normal command (deepspec/collect.py, deepspec/train.py); finished caches are reused (collect resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny target that builds in minutes on a few CPU cores; 6 layers so the drafter reads 3 of them.
PRESETS = {
    "small": [
        "target.tiny.max_files=800",
        "target.tiny.vocab_size=2048",
        "target.tiny.hidden_size=128",
        "target.tiny.num_layers=6",
        "target.tiny.num_heads=4",
        "target.tiny.num_kv_heads=2",
        "target.tiny.head_dim=32",
        "target.tiny.intermediate_size=384",
        "target.tiny.seq_len=256",
        "target.tiny.batch_size=16",
        "target.tiny.train_steps=300",
        # Every run sees the same sequences in the same order (120 steps × 8 of the 2400 cached);
        # sized for a busy 2-core CPU.
        "data.max_train_samples=2400",
        "train.max_steps=120",
        "eval.num_prompts=24",
        "eval.max_new_tokens=64",
    ],
    "default": [],
}


def sh(args, log: Path) -> float:
    print("+", " ".join(str(a) for a in args), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run(
            [sys.executable, *map(str, args)],
            cwd=os.getcwd(),
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    if res.returncode != 0:
        sys.exit(f"failed (exit {res.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.time() - t0


def main(argv) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/bench_cache")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--skip-online", action="store_true", help="no online control run")
    args, overrides = ap.parse_known_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = PRESETS[args.preset] + overrides
    results, wall = {}, {}

    for dtype in ("bf16", "fp8"):
        cache = out / f"cache-{dtype}"
        wall[f"collect-{dtype}"] = sh(
            [
                ROOT / "deepspec" / "collect.py",
                *common,
                f"collect.cache_dir={cache}",
                f"collect.dtype={dtype}",
            ],
            out / f"collect-{dtype}.log",
        )
    runs = [
        ("bf16", ["data.source=cache", f"data.cache_dir={out / 'cache-bf16'}"]),
        ("fp8", ["data.source=cache", f"data.cache_dir={out / 'cache-fp8'}"]),
    ]
    if not args.skip_online:
        runs.append(("online", []))
    for name, extra in runs:
        run_dir = out / f"train-{name}"
        wall[f"train-{name}"] = sh(
            [
                ROOT / "deepspec" / "train.py",
                *common,
                *extra,
                f"train.output_dir={run_dir}",
                "train.progress_bar=false",
                "export.after_training=false",
            ],
            out / f"train-{name}.log",
        )
        ev = json.loads((run_dir / "eval.json").read_text())
        summary = json.loads((run_dir / "train_summary.json").read_text())
        results[name] = {
            "tau": {t: m["tau"] for t, m in ev["temperatures"].items()},
            "acceptance_rate": {t: m["acceptance_rate"] for t, m in ev["temperatures"].items()},
            "final_loss": summary["final_metrics"].get("loss"),
        }

    sizes = {}
    for dtype in ("bf16", "fp8"):
        m = json.loads((out / f"cache-{dtype}" / "manifest.json").read_text())
        sizes[dtype] = {
            "bytes_per_token_formula": m["bytes_per_token"],
            "bytes_per_token_on_disk": m["total_bytes"] / m["num_tokens"],
            "reference_bytes_per_token": m["reference_bytes_per_token"],
            "total_bytes": m["total_bytes"],
            "num_tokens": m["num_tokens"],
            "num_sequences": m["num_sequences"],
            "hidden_size": m["hidden_size"],
            "layer_ids": m["layer_ids"],
        }
    ref = sizes["bf16"]["reference_bytes_per_token"]
    rows = [
        f"| cache | bytes/token (formula) | bytes/token (on disk) | × reference (6+2·H·(n+1) = {ref}) |",
        "| --- | --- | --- | --- |",
    ]
    for dtype, s in sizes.items():
        rows.append(
            f"| {dtype} | {s['bytes_per_token_formula']:.1f} | {s['bytes_per_token_on_disk']:.1f} | "
            f"{s['bytes_per_token_on_disk'] / ref:.3f} |"
        )
    temps = list(results["bf16"]["tau"])
    rows += [
        "",
        "| drafter trained from | " + " | ".join(f"τ (T={t})" for t in temps) + " | final loss |",
        "| --- | " + " | ".join("---" for _ in temps) + " | --- |",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | " + " | ".join(f"{r['tau'][t]:.3f}" for t in temps) + f" | {r['final_loss']:.4f} |"
        )
    cost = {t: (1.0 - results["fp8"]["tau"][t] / results["bf16"]["tau"][t]) * 100 for t in temps}
    rows.append("")
    rows.append("fp8 τ cost vs bf16: " + ", ".join(f"T={t}: {c:+.2f}%" for t, c in cost.items()))
    if "online" in results:
        noise = {t: (1.0 - results["bf16"]["tau"][t] / results["online"]["tau"][t]) * 100 for t in temps}
        rows.append(
            "bf16 cache vs online (noise floor): " + ", ".join(f"T={t}: {c:+.2f}%" for t, c in noise.items())
        )
    ratio = sizes["fp8"]["bytes_per_token_on_disk"] / ref
    ok = ratio <= 0.55 and all(c <= 2.0 for c in cost.values())
    rows.append(
        f"acceptance (fp8 ≤ 0.55× reference bytes/token and ≤ 2% τ cost): {'PASS' if ok else 'FAIL'} "
        f"({ratio:.3f}×, max cost {max(cost.values()):+.2f}%)"
    )
    table = "\n".join(rows)
    print(table)
    report = {
        "sizes": sizes,
        "tau": results,
        "fp8_tau_cost_percent": cost,
        "wall_s": wall,
        "overrides": common,
        "pass": ok,
    }
    (out / "bench_cache.json").write_text(json.dumps(report, indent=2))
    (out / "bench_cache.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
