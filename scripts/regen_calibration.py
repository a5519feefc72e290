"""Does training on the target's own answers calibrate the confidence head, and at which temperature?

    PYTHONPATH=. python scripts/regen_calibration.py --prompts 2600 --eval-prompts 400 --out outputs/regen_calibration
    PYTHONPATH=. python scripts/regen_calibration.py --report-only --out outputs/regen_calibration

The default drafter learns from the embedded target's corpus, teacher-forced: the contexts are the
corpus's own code. At T = 0 it is used on the target's greedy continuations, which are far more
predictable, so its greedy confidence output is under-confident there (docs/evaluation.md). The
paper's drafters learn from answers the target regenerated. This script measures what that changes
on the embedded target, one stage after another (each skipped when its output is already there, so
a rerun resumes; ``--reuse`` is implied):

1. ``prompts_t0.jsonl``, ``prompts_t1.jsonl``: ``--prompts`` training prompts of the embedded
   target's chat data, drawn with ``--seed``; the T = 1 copy's ids end in ``@t1`` so that both sets of
   answers can be trained on together.
2. ``regen_t0.jsonl`` (greedy) and ``regen_t1.jsonl`` (pure sampling: T = 1, top-p 1, top-k off),
   written by ``deepspec/regenerate.py``.
3. A drafter per training data set, each ``recipe=tiny`` with its 300 steps: ``corpus`` (the recipe's
   own data, as the README's main job), ``regen-t0``, ``regen-t1`` and ``regen-mix`` (both answer
   sets); ``--models`` adds other drafters (EAGLE-3-1L, DFlash-2L, ... as in bench_drafters.py) on
   the same data, in folders named ``<data>+<drafter>``.
4. Each evaluated by ``deepspec/evaluate.py`` on the same ``--eval-prompts`` held-out prompts at
   T = 0 and T = 1 (STS fitted on half the prompts, scored on the other half).
5. ``regen_calibration.{json,md}``: τ with a 95 % interval over prompts, τ over the corpus drafter's
   (paired by prompt), and per slot the ECE after STS, its floor and the AUC, against the goal
   ECE ≤ 1.5 % and AUC > 0.6 at every slot; and the recipe's DSpark-2L over each other drafter
   trained on the same data.

Arguments after ``--`` are Hydra overrides given to every stage (``recipe=tiny`` unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from deepspec import atomic  # noqa: E402
from deepspec.entrypoint import compose_config, split_overrides, with_default_recipe  # noqa: E402
from deepspec.eval import intervals  # noqa: E402
from deepspec.eval.drafter_bench import DRAFTERS as MODELS  # noqa: E402
from deepspec.eval.drafter_bench import interval_text, verdict  # noqa: E402

TEMPS = ("0.0", "1.0")
# How each answer set is sampled: greedy, and the target's plain distribution (what T = 1 decoding verifies against).
REGEN = {
    "t0": ["regen.sampling.temperature=0"],
    "t1": ["regen.sampling.temperature=1.0", "regen.sampling.top_p=1.0", "regen.sampling.top_k=0"],
}
DATA = {"corpus": [], "regen-t0": ["t0"], "regen-t1": ["t1"], "regen-mix": ["t0", "t1"]}  # name: answer sets
MAIN_MODEL = "DSpark-2L"  # the recipe's drafter; the others are compared with it on the same data
ECE_GOAL, AUC_GOAL = 0.015, 0.6


def run_name(data: str, model: str) -> str:
    return data if model == MAIN_MODEL else f"{data}+{model}"


def write_prompts(train: List[Dict], n: int, seed: int, path: Path, id_suffix: str = "") -> int:
    """``n`` of the ``train`` conversations (a sample drawn with ``seed``), one per line."""
    sample = list(train)  # shuffled as a copy: the caller writes several files from one list
    random.Random(seed).shuffle(sample)
    lines = [json.dumps({"id": r["id"] + id_suffix, "messages": r["messages"]}) for r in sample[:n]]
    atomic.write_text(path, "\n".join(lines) + "\n")
    return len(lines)


def _run(cmd: List[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print("+ " + " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(
            f"{cmd[1]} failed (exit {proc.returncode}); its log: {log}\n{log.read_text()[-2000:]}"
        )


def run_stages(args, overrides: List[str]) -> None:
    out, py = Path(args.out), sys.executable
    out.mkdir(parents=True, exist_ok=True)
    train: Optional[List[Dict]] = None  # the embedded target's training conversations, cut once
    for key in REGEN:
        prompts, answers = out / f"prompts_{key}.jsonl", out / f"regen_{key}.jsonl"
        if not prompts.is_file():
            if train is None:
                from deepspec.data.tiny_chat import tiny_chat_splits

                train = tiny_chat_splits(compose_config(overrides).target.tiny)["train"]
            n = write_prompts(train, args.prompts, args.seed, prompts, f"@{key}" * (key != "t0"))
            print(f"{prompts}: {n} prompts", flush=True)
        if not (out / f"regen_{key}.meta.json").is_file():
            cmd = [py, str(ROOT / "deepspec/regenerate.py"), *overrides, f"regen.input={prompts}",
                   f"regen.output={answers}", f"regen.max_new_tokens={args.max_new_tokens}", f"regen.batch_size={args.regen_batch}", "regen.resume=true",
                   *REGEN[key]]  # fmt: skip
            _run(cmd, out / f"regen_{key}.log", args.threads)
    for data_name, model in [(d, m) for m in args.model_list for d in args.data_list]:
        keys, name = DATA[data_name], run_name(data_name, model)
        group, layers = MODELS[model]
        run = out / name
        if not (run / "train_summary.json").is_file():
            data = [f"model={group}", f"model.num_layers={layers}"]
            if keys:
                paths = ",".join(str(out / f"regen_{k}.jsonl") for k in keys)
                data += ["data.source=chat", f"data.path='{paths}'", "data.heldout_fraction=0.02"]
            cmd = [py, str(ROOT / "deepspec/train.py"), *overrides, *data, f"train.output_dir={run}",
                   f"train.seed={args.seed}", "eval.enabled=false", "train.progress_bar=false"]  # fmt: skip
            _run(cmd, out / f"train_{name}.log", args.threads)
        for t in TEMPS:
            ev = out / f"eval_{name}_T{t}"
            if not (ev / "eval.json").is_file():
                cmd = [py, str(ROOT / "deepspec/evaluate.py"), *overrides, f"eval.drafter={run}",
                       f"eval.num_prompts={args.eval_prompts}", f"eval.temperatures=[{t}]", "eval.batch_size=8",
                       f"eval.output_dir={ev}", "eval.progress_bar=false", "eval.plots=false",
                       "eval.scheduler=false", f"eval.seed={args.seed}"]  # fmt: skip
                _run(cmd, out / f"eval_{name}_T{t}.log", args.threads)


def load_eval(ev: Path, temp: str) -> Dict:
    """τ, the per-prompt (rounds, accepted) counts and the calibration of one evaluation folder."""
    e = json.loads((ev / "eval.json").read_text())
    m = e["datasets"]["tiny"]["temperatures"][temp]
    recs = [json.loads(x) for x in (ev / "rounds.jsonl").read_text().splitlines() if x.strip()]
    c = m.get("confidence") or {"before": [], "after": []}  # none: the drafter has no confidence head
    return {
        "tau": m["tau"],
        "counts": intervals.prompt_counts(recs, float(temp), num_prompts=m["num_prompts"]),
        "event": c.get("event"),
        "scored_rounds": c.get("evaluation_rounds"),
        "sts_temperatures": c.get("sts_temperatures"),
        "ece_raw": [s["ece"] for s in c["before"]],
        "ece": [s["ece"] for s in c["after"]],
        "ece_floor": [s["ece_floor"] for s in c["after"]],
        "auc": [s["auc"] for s in c["after"]],
        "observed": [s["observed"] for s in c["after"]],
    }


def goal_note(r: Dict) -> str:
    if not r["ece"]:
        return "no confidence head"
    ece_miss = [f"{k + 1}: {e * 100:.2f} %" for k, e in enumerate(r["ece"]) if e > ECE_GOAL]
    auc_miss = [f"{k + 1}: {a:.3f}" for k, a in enumerate(r["auc"]) if a is None or a <= AUC_GOAL]
    if not ece_miss and not auc_miss:
        return "met at every slot"
    parts = ([f"ECE misses at slot {', '.join(ece_miss)}"] if ece_miss else []) + (
        [f"AUC misses at slot {', '.join(auc_miss)}"] if auc_miss else []
    )
    return "; ".join(parts)


def report(out: Path) -> Dict:
    runs: Dict[str, Dict[str, Dict]] = {}  # run name -> temperature -> evaluation
    for data_name in DATA:
        for model in MODELS:
            for t in TEMPS:
                ev = out / f"eval_{run_name(data_name, model)}_T{t}"
                if (ev / "eval.json").is_file():
                    runs.setdefault(run_name(data_name, model), {})[t] = load_eval(ev, t) | {
                        "data": data_name,
                        "model": model,
                    }
    if "corpus" not in runs:
        raise SystemExit(
            f"{out}: no evaluated corpus drafter (eval_corpus_T*/eval.json); run the stages first"
        )

    def ratio(a: Optional[Dict], b: Optional[Dict]) -> Optional[intervals.Interval]:
        return None if a is None or b is None else intervals.tau_ratio_interval([a["counts"]], [b["counts"]])

    def as_dict(iv: Optional[intervals.Interval]) -> Optional[Dict]:
        return None if iv is None else iv.to_dict()

    rows = []
    for name, by_t in runs.items():
        for t, r in sorted(by_t.items()):
            corpus = runs.get(run_name("corpus", r["model"]), {}).get(t) if r["data"] != "corpus" else None
            rows.append(
                {"drafter": name, "temperature": float(t), "tau_interval": intervals.tau_interval([r["counts"]]).to_dict(),
                 "tau_over_corpus": as_dict(ratio(r, corpus)), "goal": goal_note(r), **{k: v for k, v in r.items() if k != "counts"}}
            )  # fmt: skip
    versus = []
    for by_t in runs.values():
        for t, r in sorted(by_t.items()):
            main_run = runs.get(run_name(r["data"], MAIN_MODEL), {}).get(t)
            if r["model"] != MAIN_MODEL and main_run is not None:
                iv = ratio(main_run, r)
                versus.append({"data": r["data"], "temperature": float(t), "pair": f"{MAIN_MODEL} / {r['model']}",
                               "ratio": iv.to_dict(), "verdict": verdict(MAIN_MODEL, r["model"], iv)})  # fmt: skip
    result = {"out": str(out), "ece_goal": ECE_GOAL, "auc_goal": AUC_GOAL, "rows": rows, "versus": versus}
    atomic.write_json(out / "regen_calibration.json", result, indent=1)
    atomic.write_text(out / "regen_calibration.md", "\n".join(table(rows) + versus_table(versus)) + "\n")
    return result


def _iv(d: Optional[Dict]) -> str:
    return "-" if d is None else interval_text(d)


def table(rows: List[Dict]) -> List[str]:
    pct = lambda xs: " ".join(f"{x * 100:.1f}" for x in xs) or "-"  # noqa: E731
    lines = [
        "| training data | T | τ [95 %] | τ / corpus [95 %] | ECE after STS %, slot 1..γ | ECE floor % | AUC, slot 1..γ | goal (ECE ≤ 1.5 %, AUC > 0.6) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        auc = " ".join("-" if a is None else f"{a:.2f}" for a in r["auc"]) or "-"
        lines.append(
            f"| {r['drafter']} | {r['temperature']:g} | {_iv(r['tau_interval'])} | {_iv(r['tau_over_corpus'])} "
            f"| {pct(r['ece'])} | {pct(r['ece_floor'])} | {auc} | {r['goal']} |"
        )
    n = rows[0]["tau_interval"]["prompts"] if rows else 0
    lines.append(f"\nOne training seed; intervals over {n} prompts (paired by prompt for the ratios).")
    return lines


def versus_table(versus: List[Dict]) -> List[str]:
    """The recipe's drafter against the other drafters trained on the same data (paired by prompt)."""
    if not versus:
        return []
    lines = [
        "",
        "| training data | T | τ ratio | value [95 %] | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in versus:
        lines.append(
            f"| {v['data']} | {v['temperature']:g} | {v['pair']} | {_iv(v['ratio'])} | {v['verdict']} |"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> Dict:
    argv, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(
        description="Confidence calibration of drafters trained on regenerated answers."
    )
    ap.add_argument(
        "--prompts", type=int, default=2600, help="training prompts regenerated at each temperature"
    )
    ap.add_argument(
        "--eval-prompts", type=int, default=400, help="held-out prompts each drafter is evaluated on"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128, help="longest regenerated answer")
    ap.add_argument("--regen-batch", type=int, default=32, help="prompts per regeneration call")
    ap.add_argument("--seed", type=int, default=0, help="prompt sample, training and decoding seed")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every stage")
    ap.add_argument("--data", default=",".join(DATA), help=f"training data sets, of {','.join(DATA)}")
    ap.add_argument("--models", default=MAIN_MODEL, help=f"drafters trained on each, of {','.join(MODELS)}")
    ap.add_argument("--report-only", action="store_true", help="only tabulate the folders already in --out")
    ap.add_argument("--out", default="outputs/regen_calibration")
    args = ap.parse_args(argv)
    args.data_list = [d for d in args.data.split(",") if d]
    args.model_list = [m for m in args.models.split(",") if m]
    for what, names, known in (("--data", args.data_list, DATA), ("--models", args.model_list, MODELS)):
        if not names or any(n not in known for n in names):
            ap.error(f"{what} {','.join(names)!r}: expected a comma list of {', '.join(known)}")
    if not args.report_only:
        run_stages(args, with_default_recipe(overrides))
    result = report(Path(args.out))
    print((Path(args.out) / "regen_calibration.md").read_text())
    return result


if __name__ == "__main__":
    main()
