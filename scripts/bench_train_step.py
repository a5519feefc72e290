"""Time, peak memory and achieved GFLOP/s of the training step: every loss path side by side.

    PYTHONPATH=. python scripts/bench_train_step.py                  # Qwen3 vocabulary (151,936), hidden 64
    PYTHONPATH=. python scripts/bench_train_step.py --vocab 151936 --hidden 256 --batch 1 --ctx 512 \\
        --anchors 64,256 --markov-rank 256 --draft-vocab 32768 --scopes step --repeats 3 --threads 2

Two scopes:

* ``loss``: forward + backward of the DSpark loss (0.1·CE + 0.9·L1 + BCE) on given draft logits
  [B, A, γ, V], target logits and confidence logits: ``reference`` (docs/method.md, Losses, read
  literally: fp32 softmaxes of draft and target over the whole vocabulary, kept by autograd) and
  ``lean`` (deepspec/losses/vocab_terms.py);
* ``step``: a 2-layer DSpark drafter (Markov rank r, confidence head) forward on random target
  features, the target's logits from a frozen lm_head, the loss, backward into every trainable
  parameter. Variants (scripts/bench_step_workload.py, STEP_VARIANTS): ``reference``, ``lean`` (the
  default), ``lean_lazy`` (+ ``loss.lazy_target_logits``: today's leanest full-vocabulary step, the
  baseline of the ratios), ``fused`` (+ ``loss.chunked_head``: gradients formed in the loss's
  forward, deepspec/losses/chunked_head.py) and, with ``--draft-vocab d``, ``draft_vocab_fused``
  (the same with a drafter of d output rows: the same weights' rows of d tokens).
  ``--variants`` picks others too: ``chunked_recompute``, ``draft_vocab``, ``draft_vocab_eager``.

Per anchor count (``--anchors``, a comma list) and variant: equality against the reference (|Δloss|,
max |Δgrad| absolute and relative to the largest entry; drafters with a draft vocabulary are another
model and have none), the median and min wall time over ``--repeats`` runs interleaved in one process
(rotating which goes first), the process CPU time, achieved head GFLOP/s (nominal head FLOPs over
the median wall time) and the peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was
allocated before the call; on CPU the peak resident set of a fresh subprocess during one call after a
warm-up (``/proc/self/clear_refs`` resets the high-water mark; glibc returns every allocation >= 64 KiB
to the OS on free, so RSS follows live memory). Outputs: stdout and ``--out``/bench_train_step.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_step_workload import (  # noqa: E402
    DEFAULT_STEP,
    STEP_VARIANTS,
    Workload,
    head_flops,
    machine,
    max_abs,
    max_rel,
    measure_peak,
    peak_in_subprocess,
    sync,
)

BASE = "lean_lazy"
# Goals of the training-step benchmark, as (time, memory) ratios to the baseline.
GOALS = {"fused": (1.1, 0.4), "draft_vocab_fused": (0.4, 0.5)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--anchors", default="16", help="anchors per sequence; a comma list runs each")
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--ctx", type=int, default=96, help="sequence length of the random target features")
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=0, help="loss rows per chunk (0 = auto)")
    ap.add_argument(
        "--draft-vocab", type=int, default=0, help="d of the draft-vocabulary variants (0 = skip them)"
    )
    ap.add_argument(
        "--variants", default="", help="comma list of step variants (default: " + ",".join(DEFAULT_STEP) + ")"
    )
    ap.add_argument(
        "--equality", choices=("all", "first", "none"), default="all",
        help="equality runs at every anchor count, the first only, or none (each costs a step per variant)",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scopes", default="loss,step")
    ap.add_argument("--out", default="outputs/bench_train_step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_measure", nargs=3, metavar=("SCOPE", "VARIANT", "ANCHORS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.anchor_list = [int(a) for a in str(args.anchors).split(",")]
    return args


def step_variants(args):
    if args.variants:
        picked = args.variants.split(",")
        unknown = [v for v in picked if v not in STEP_VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(STEP_VARIANTS)}")
        out = tuple(v for v in picked if v != "reference")
        if "reference" in picked or args.equality != "none":  # the equality runs need it
            out = ("reference",) + out
    else:
        out = DEFAULT_STEP
    if not args.draft_vocab:
        out = tuple(v for v in out if not STEP_VARIANTS[v][0])
    return out


def run_case(args, scope: str, anchors: int, equality: bool) -> dict:
    """Every variant of one scope at one anchor count: equality, times, peak memory."""
    variants = step_variants(args) if scope == "step" else ("reference", "lean")
    w = Workload(args, scope, anchors)
    eq = {}
    if equality:
        ref_loss, ref_grads = w.run("reference", want_grads=True)
        for v in variants[1:]:
            if scope == "step" and STEP_VARIANTS[v][0]:
                continue  # another model (fewer output rows): nothing to equal
            loss, grads = w.run(v, want_grads=True)
            eq[v] = {
                "loss_reference": ref_loss,
                "loss": loss,
                "abs_loss_diff": abs(ref_loss - loss),
                "max_abs_grad_diff": max_abs(grads, ref_grads),
                "max_rel_grad_diff": max_rel(grads, ref_grads),
            }
            del grads
        del ref_grads
    times = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for r in range(args.repeats):
        k = r % len(variants)  # rotate which variant goes first
        for v in variants[k:] + variants[:k]:
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            w.run(v)
            sync(args.device)
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
            print(f"  {scope} A={anchors} {v}: {times[v][-1]:.2f} s", file=sys.stderr, flush=True)
    del w
    mem = {v: peak_in_subprocess(args, scope, v, anchors) for v in variants}
    s = {
        "anchors": anchors,
        "rows": args.batch * anchors * args.block,
        "variants": list(variants),
        "equality": eq,
        "time_s": times,
        "cpu_time_s": cpu,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
        "peak_bytes": {k: m["peak_bytes"] for k, m in mem.items()},
        "memory_method": next(iter(mem.values()))["method"],
    }
    if scope == "step":
        s["head_gflop"] = {v: head_flops(args, v, anchors) / 1e9 for v in variants}
        s["gflop_per_s"] = {v: s["head_gflop"][v] / s["median_s"][v] for v in variants}
    for base in ("reference", "lean", BASE):
        if base in variants:
            s[f"ratios_vs_{base}"] = {
                v: {
                    "wall_time": s["median_s"][v] / s["median_s"][base],
                    "cpu_time": s["median_cpu_s"][v] / s["median_cpu_s"][base],
                    "peak_memory": s["peak_bytes"][v] / max(s["peak_bytes"][base], 1),
                }
                for v in variants
                if v != base
            }
    s["goals"] = {}
    for v, (t_goal, m_goal) in GOALS.items():
        r = s.get(f"ratios_vs_{BASE}", {}).get(v)
        if r:
            s["goals"][v] = {
                "time_goal": t_goal,
                "memory_goal": m_goal,
                "time_met": r["wall_time"] <= t_goal,
                "memory_met": r["peak_memory"] <= m_goal,
            }
    return s


def table(args, results: dict) -> str:
    lines = [
        f"# train-step bench: V={args.vocab:,}, hidden {args.hidden}, Markov rank {args.markov_rank}, "
        f"batch {args.batch}, {args.ctx} tokens, γ = {args.block}, draft vocabulary d = {args.draft_vocab:,}",
        f"machine: {results['machine']}",
        "",
    ]
    for key, s in results["cases"].items():
        unit = s["rows"] * args.vocab * 4
        lines += [
            f"## {key}: {s['rows']} block positions; one fp32 [positions, V] tensor = {unit / 2**20:.0f} MiB",
            "",
            "| variant | wall median s | wall min s | CPU median s | head GFLOP/s | peak MiB "
            "| peak / [rows,V] fp32 | time / lean_lazy | memory / lean_lazy | \\|Δloss\\| | max \\|Δgrad\\| (rel) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in s["variants"]:
            pb, e = s["peak_bytes"][v], s["equality"].get(v)
            diff = (
                f"{e['abs_loss_diff']:.1e} | {e['max_abs_grad_diff']:.1e} ({e['max_rel_grad_diff']:.1e})"
                if e
                else "- | -"
            )
            gf = f"{s['gflop_per_s'][v]:.0f}" if "gflop_per_s" in s else "-"
            rb = s.get(f"ratios_vs_{BASE}", {}).get(v)
            rt = f"×{rb['wall_time']:.2f} | ×{rb['peak_memory']:.2f}" if rb else "- | -"
            lines.append(
                f"| {v} | {s['median_s'][v]:.2f} | {min(s['time_s'][v]):.2f} | {s['median_cpu_s'][v]:.2f} | "
                f"{gf} | {pb / 2**20:.0f} | {pb / unit:.2f} | {rt} | {diff} |"
            )
        lines.append("")
        for v, gl in s["goals"].items():
            r = s[f"ratios_vs_{BASE}"][v]
            lines.append(
                f"- goal {v} vs {BASE}: time ×{r['wall_time']:.2f} (goal ≤ {gl['time_goal']}: "
                f"{'met' if gl['time_met'] else 'missed'}), peak memory ×{r['peak_memory']:.2f} "
                f"(goal ≤ {gl['memory_goal']}: {'met' if gl['memory_met'] else 'missed'})"
            )
        for v, r in s.get("ratios_vs_lean", {}).items() if key.startswith("step") else ():
            lines.append(
                f"- {v} / lean (the default before): wall time ×{r['wall_time']:.2f}, "
                f"peak memory ×{r['peak_memory']:.2f}"
            )
        for v, r in s.get("ratios_vs_reference", {}).items() if key.startswith("loss") else ():
            lines.append(
                f"- {v} / reference: wall time ×{r['wall_time']:.2f}, peak memory ×{r['peak_memory']:.2f}"
            )
        lines.append("")
    lines.append(f"- memory: {next(iter(results['cases'].values()))['memory_method']}")
    lines.append(
        "- head GFLOP/s: the step's nominal head matmul FLOPs (draft logits + Markov bias + target logits "
        "forward, their gradients backward; recomputation not counted) over the median wall time"
    )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args._measure:
        scope, variant, anchors = args._measure
        print(json.dumps(measure_peak(args, scope, variant, int(anchors))))
        return {}
    results = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "machine": machine(args),
        "cases": {},
    }
    for scope in args.scopes.split(","):
        for i, anchors in enumerate(args.anchor_list):
            eq = args.equality == "all" or (args.equality == "first" and i == 0)
            results["cases"][f"{scope}, {anchors} anchors"] = run_case(args, scope, anchors, eq)
    text = table(args, results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from deepspec import atomic

    atomic.write_json(out / "bench_train_step.json", results)
    atomic.write_text(out / "bench_train_step.md", text + "\n")
    return results


if __name__ == "__main__":
    main()
