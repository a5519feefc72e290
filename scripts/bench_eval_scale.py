"""What the drafter's KV cache and batched evaluation buy, measured side by side in one run.

    PYTHONPATH=. python scripts/bench_eval_scale.py                       # both parts, ~2 min on 2 busy cores
    PYTHONPATH=. python scripts/bench_eval_scale.py --only cache --contexts 128,1024,2048,4096
    PYTHONPATH=. python scripts/bench_eval_scale.py --only batch --target /path/to/tiny-target-<hash>

Two parts (``--only cache|batch``; default both):

* ``cache``: draft milliseconds per round at several context lengths, with and without the
  drafter's KV cache. Without: ``drafter.draft`` projects the whole context (fc + hidden_norm, then
  every layer's keys/values) and runs the block. With: one round = commit ``--commit`` new positions
  to the cache (what a round with τ = ``--commit`` adds) + ``drafter.draft_cached``. The two
  alternate within each repeat; the median over ``--repeats`` is reported. DSpark-2L (Markov rank
  256, confidence head) and EAGLE-3-1L, γ = 7, T = 0.
* ``batch``: evaluation tokens/s at ``--batch-sizes`` (prompts decoded together), speculative
  (cache on) and the plain target, at T = 0 and T = 1, on the same prompts and seeds; also checks
  that every prompt's tokens equal those at B = 1.

Target: ``--target`` (a local HF folder, e.g. a built tiny target), else a randomly initialised
Qwen3 with the default tiny target's shape (deepspec/config.py TinyTargetConfig: 6 layers × 128,
vocab 4,096). The drafters are randomly initialised with the tiny recipe's shapes: fine for timing,
meaningless for acceptance (τ is reported so the tokens/s can be read against it).
Writes ``--out``/bench_draft_cache.{json,md} and bench_eval_batch.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deepspec import atomic  # noqa: E402
from deepspec.config import DrafterConfig, TinyTargetConfig  # noqa: E402
from deepspec.eval.spec_decode import generate  # noqa: E402
from deepspec.models import build_drafter  # noqa: E402
from deepspec.models.config import resolve_drafter_config  # noqa: E402
from deepspec.models.draft_cache import DraftCache  # noqa: E402
from deepspec.target.adapter import TargetModel  # noqa: E402

DRAFTERS = {
    "DSpark-2L": dict(kind="dspark", num_layers=2),
    "EAGLE-3-1L": dict(kind="eagle3", num_layers=1, markov_rank=0, enable_confidence_head=False),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["cache", "batch"], default=None)
    ap.add_argument("--target", default=None, help="local HF folder; default: random tiny-shaped Qwen3")
    ap.add_argument("--contexts", default="128,1024,2048")
    ap.add_argument("--commit", type=int, default=2, help="positions one cached round commits")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    return ap.parse_args(argv)


def load_target(args) -> tuple:
    layer_ids = None
    if args.target:
        from deepspec.target.loading import check_target_source, load_causal_lm

        model = load_causal_lm(check_target_source(args.target))
        what = f"{args.target} (loaded)"
    else:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        t = TinyTargetConfig()
        torch.manual_seed(args.seed)
        cfg = Qwen3Config(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads,
            head_dim=t.head_dim,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        model = Qwen3ForCausalLM(cfg)
        what = (
            f"randomly initialised Qwen3 of the default tiny target's shape ({t.num_layers} layers x "
            f"{t.hidden_size}, vocab {t.vocab_size})"
        )
    return model.eval(), what, layer_ids


def make_drafter(model, kind: str, seed: int):
    dc = DrafterConfig(block_size=7, num_target_features=5, **DRAFTERS[kind])
    spec = resolve_drafter_config(dc, model.config.to_dict(), mask_token_id=1)
    d = build_drafter(spec)
    d.init_weights(seed=seed)
    d.load_target_head(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    return d.eval(), spec


def time_rounds(d, feats, ids, n: int, commit: int, repeats: int) -> dict:
    """Seconds per draft round at context n: uncached draft() vs commit positions + draft_cached()."""
    anchor = int(ids[0, n])
    base = n - commit
    cache = DraftCache(1, "cpu")
    d.extend_cache(cache, feats[:, :base], ids[:, :base], torch.tensor([base]))
    counts = torch.tensor([commit])

    def uncached():
        d.draft(feats[:, :n], anchor, 0.0, context_ids=ids[:, :n])

    def cached():
        d.extend_cache(cache, feats[:, base:n], ids[:, base:n], counts)
        d.draft_cached(cache, torch.tensor([anchor]), 0.0)
        cache.lengths -= counts  # rewind: the next repeat commits the same positions again

    fns = {"uncached": uncached, "cached": cached}
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def bench_cache(args, model) -> dict:
    contexts = [int(x) for x in args.contexts.split(",")]
    longest = max(contexts) + args.commit
    if longest > model.config.max_position_embeddings:
        raise SystemExit(
            f"--contexts up to {max(contexts)} exceed the target's {model.config.max_position_embeddings} positions"
        )
    out = {}
    for kind in DRAFTERS:
        d, spec = make_drafter(model, kind, args.seed)
        tm = TargetModel(model, spec.target_layer_ids)
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(2, spec.vocab_size, (1, longest + 1), generator=g)
        with torch.no_grad():
            feats = tm(ids).aux
        rows = {}
        for n in contexts:
            wall, cpu = time_rounds(d, feats, ids, n, args.commit, args.repeats)
            rows[n] = {k: 1000 * statistics.median(v) for k, v in wall.items()}
            rows[n]["min"] = {k: 1000 * min(v) for k, v in wall.items()}
            rows[n]["cpu"] = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
            print(
                f"{kind} context {n}: uncached {rows[n]['uncached']:.2f} ms, cached {rows[n]['cached']:.2f} ms "
                f"(CPU {rows[n]['cpu']['uncached']:.2f} / {rows[n]['cpu']['cached']:.2f})",
                flush=True,
            )
        lo, hi = min(contexts), max(contexts)
        out[kind] = {
            "target_layer_ids": list(spec.target_layer_ids),
            "ms_per_round": rows,
            "cached_ratio_longest_vs_shortest": rows[hi]["cached"] / rows[lo]["cached"],
            "uncached_ratio_longest_vs_shortest": rows[hi]["uncached"] / rows[lo]["uncached"],
            "cached_cpu_ratio_longest_vs_shortest": rows[hi]["cpu"]["cached"] / rows[lo]["cpu"]["cached"],
            "uncached_cpu_ratio_longest_vs_shortest": rows[hi]["cpu"]["uncached"]
            / rows[lo]["cpu"]["uncached"],
        }
    return {"contexts": contexts, "commit_per_round": args.commit, "drafters": out}


def bench_batch(args, model) -> dict:
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    d, spec = make_drafter(model, "DSpark-2L", args.seed)
    tm = TargetModel(model, spec.target_layer_ids)
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(2, spec.vocab_size) for _ in range(rng.randint(32, 96))] for _ in range(args.prompts)
    ]

    def run(drafter, size, temp):
        results, t0, c0 = [], time.perf_counter(), time.process_time()
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            gens = [
                torch.Generator().manual_seed(args.seed * 1_000_003 + start + j) for j in range(len(chunk))
            ]
            results += generate(tm, drafter, chunk, args.max_new_tokens, temp, (), gens)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(r.tokens) for r in results)
        rounds = [x for r in results for x in r.rounds]
        stats = {
            "tokens": tokens,
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu,
            "tau": sum(x.tau for x in rounds) / len(rounds) if rounds else None,
        }
        return stats, [r.tokens for r in results]

    generate(tm, d, prompts[: max(sizes)], 4, 0.0)  # warm-up
    out = {}
    for temp in (0.0, 1.0):
        per = {}
        ref = {}
        for size in sizes:
            row = {}
            for name, drafter in (("speculative", d), ("target", None)):
                stats, toks = run(drafter, size, temp)
                ref.setdefault(name, toks)
                stats["tokens_equal_to_batch_1"] = toks == ref[name]
                row[name] = stats
            per[size] = row
            print(
                f"T={temp:g} B={size}: speculative {row['speculative']['tokens_per_s']:.0f} tok/s "
                f"(τ {row['speculative']['tau']:.2f}), target {row['target']['tokens_per_s']:.0f} tok/s; per CPU-s "
                f"{row['speculative']['tokens_per_cpu_s']:.0f} / {row['target']['tokens_per_cpu_s']:.0f}",
                flush=True,
            )
        out[str(temp)] = per
    return {
        "batch_sizes": sizes,
        "prompts": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "max_new_tokens": args.max_new_tokens,
        "drafter": "DSpark-2L",
        "target_layer_ids": list(spec.target_layer_ids),
        "temperatures": out,
    }


def machine(args) -> str:
    from deepspec.machine import cpu_name

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} torch thread(s), load average "
        f"{load:.1f} at the start (torch {torch.__version__})"
    )


def cache_table(res: dict) -> str:
    lines = [
        "| drafter | context | uncached ms/round | cached ms/round | cached / uncached | uncached CPU ms | cached CPU ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in res["drafters"].items():
        for n, m in r["ms_per_round"].items():
            lines.append(
                f"| {kind} | {int(n):,} | {m['uncached']:.2f} | {m['cached']:.2f} | ×{m['cached'] / m['uncached']:.2f} "
                f"| {m['cpu']['uncached']:.2f} | {m['cpu']['cached']:.2f} |"
            )
    lo, hi = min(res["contexts"]), max(res["contexts"])
    lines.append("")
    for kind, r in res["drafters"].items():
        lines.append(
            f"- {kind}: context {hi:,} costs ×{r['cached_ratio_longest_vs_shortest']:.2f} of {lo:,} with the cache "
            f"(goal ≤ ×1.5), ×{r['uncached_ratio_longest_vs_shortest']:.2f} without (wall medians); in CPU time "
            f"×{r['cached_cpu_ratio_longest_vs_shortest']:.2f} with, ×{r['uncached_cpu_ratio_longest_vs_shortest']:.2f} without"
        )
    return "\n".join(lines)


def batch_table(res: dict) -> str:
    lines = [
        "| T | B | speculative tok/s | τ | target tok/s | speculative vs B=1 | target vs B=1 "
        "| speculative tok/CPU-s | target tok/CPU-s | tokens = B=1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for temp, per in res["temperatures"].items():
        first = per[min(per)]
        for size, row in per.items():
            s, t = row["speculative"], row["target"]
            same = "yes" if s["tokens_equal_to_batch_1"] and t["tokens_equal_to_batch_1"] else "no"
            lines.append(
                f"| {float(temp):g} | {size} | {s['tokens_per_s']:.0f} | {s['tau']:.2f} | {t['tokens_per_s']:.0f} | "
                f"×{s['tokens_per_s'] / first['speculative']['tokens_per_s']:.2f} | "
                f"×{t['tokens_per_s'] / first['target']['tokens_per_s']:.2f} | {s['tokens_per_cpu_s']:.0f} | "
                f"{t['tokens_per_cpu_s']:.0f} | {same} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    model, what, _ = load_target(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"machine: {machine(args)}\n\ntarget: {what}; drafters randomly initialised (timing only)\n"
    results = {}
    t0 = time.perf_counter()
    if args.only in (None, "cache"):
        res = bench_cache(args, model)
        res.update(machine=machine(args), target=what, wall_s=time.perf_counter() - t0)
        table = (
            f"# Draft ms per round, with and without the drafter KV cache\n\n{header}\n{cache_table(res)}\n"
        )
        atomic.write_json(out / "bench_draft_cache.json", res)
        atomic.write_text(out / "bench_draft_cache.md", table)
        print(table)
        results["cache"] = res
    t1 = time.perf_counter()
    if args.only in (None, "batch"):
        res = bench_batch(args, model)
        res.update(machine=machine(args), target=what, wall_s=time.perf_counter() - t1)
        table = f"# Evaluation tokens/s by batch size\n\n{header}\n{batch_table(res)}\n"
        atomic.write_json(out / "bench_eval_batch.json", res)
        atomic.write_text(out / "bench_eval_batch.md", table)
        print(table)
        results["batch"] = res
    return results


if __name__ == "__main__":
    main()
