"""DSpark vs DFlash on the same recipe, data and steps: one command, one table.

    python scripts/compare_dspark_dflash.py [hydra overrides applied to both runs ...]

Runs deepspec/train.py twice (model=dspark, model=dflash) in subprocesses, then reads each run's
eval.json and writes outputs/compare_dspark_dflash.json plus a markdown table on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, overrides: list[str], out_root: Path) -> dict:
    out = out_root / kind
    cmd = [sys.executable, str(ROOT / "deepspec" / "train.py"), f"model={kind}", f"train.output_dir={out}", *overrides]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=os.getcwd())
    report = json.loads((out / "eval.json").read_text())
    info = json.loads((out / "run_info.json").read_text())
    return {"eval": report, "wall_s": time.time() - t0, "trainable_params": info["trainable_params"]}


def main(argv: list[str]) -> None:
    out_root = Path("outputs") / "compare_dspark_dflash"
    results = {kind: run(kind, argv, out_root) for kind in ("dspark", "dflash")}
    rows = ["| drafter | T | τ | acceptance rate | conditional acceptance per slot | params | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    summary = {}
    for kind, r in results.items():
        for temp, m in r["eval"]["temperatures"].items():
            cond = " ".join(f"{a:.2f}" if a is not None else "-" for a in m["conditional_acceptance"])
            rows.append(f"| {kind} | {temp} | {m['tau']:.3f} | {m['acceptance_rate']:.3f} | {cond} | "
                        f"{r['trainable_params']:,} | {r['wall_s']:.0f} |")
            summary.setdefault(temp, {})[kind] = m["tau"]
    gains = {t: (v["dspark"] / v["dflash"] - 1.0) * 100 for t, v in summary.items()}
    for t, g in gains.items():
        rows.append(f"\nT={t}: DSpark τ {summary[t]['dspark']:.3f} vs DFlash {summary[t]['dflash']:.3f} ({g:+.1f}%)")
    table = "\n".join(rows)
    print(table)
    (out_root / "compare.json").write_text(json.dumps({"tau": summary, "gain_percent": gains, "runs": results}, indent=2))
    (out_root / "compare.md").write_text(table + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
