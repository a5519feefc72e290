"""Time and peak memory of the training step, lean loss vs the literal reference, side by side.

    PYTHONPATH=. python scripts/bench_train_step.py                  # Qwen3 vocabulary (151,936), hidden 64
    PYTHONPATH=. python scripts/bench_train_step.py --batch 4 --anchors 32 --repeats 7 --threads 2

Two scopes, each with ``loss.impl=reference`` (full fp32 log-softmax/softmax of draft and target over
the vocabulary for every block slot, kept by autograd: docs/method.md, Losses, read literally) and ``loss.impl=lean``
(deepspec/losses/vocab_terms.py: chunked over slots, recomputed in backward; the default), and in the step
scope also ``lean_lazy`` (lean + ``loss.lazy_target_logits=true``):

* ``loss``: forward + backward of the DSpark loss (0.1·CE + 0.9·L1 + BCE) on given draft logits
  [B, A, γ, V] (requires grad), target logits and confidence logits;
* ``step``: a 2-layer DSpark drafter (Markov rank r, confidence head) forward on random target
  features, target logits from a frozen lm_head (materialised for the reference; for the lean loss
  computed per chunk from the target's hidden states, as the training loop does), the loss,
  backward into every trainable parameter.

Outputs (stdout + ``--out``/bench_train_step.{json,md}):

* equality: |Δloss| and max |Δgrad| (absolute, and relative to the largest gradient entry) of each
  variant against the reference on the same inputs;
* time: median (and min) wall seconds over ``--repeats`` runs, the two variants interleaved in one
  process (alternating which goes first), and the ratio lean / reference; also the process CPU time
  (with one thread, the work done, which a busy shared machine does not inflate; with several
  threads it also counts their spin-waiting);
* peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before the call;
  on CPU, the peak resident set size of a fresh subprocess per variant during one call (Linux
  ``/proc/self/clear_refs`` resets the high-water mark after a warm-up call; glibc is told to return
  every allocation >= 64 KiB to the OS on free, so RSS follows live memory), above the RSS before the
  call. Inputs, parameters and the model's own logits exist in both variants and are not counted
  unless allocated during the call. Also shown in units of one fp32 [B·A·γ, V] tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deepspec.config import LossConfig  # noqa: E402
from deepspec.data.anchors import BlockTargets, block_targets  # noqa: E402
from deepspec.losses import dspark_loss, target_logits, weighted_valid  # noqa: E402

VARIANTS = ("reference", "lean", "lean_lazy")  # lean_lazy: loss.lazy_target_logits=true (step scope)
# Step scope, with --draft-vocab > 0: lean_lazy plus loss.chunked_head=true (the fully chunked head),
# a drafter with a draft vocabulary of --draft-vocab tokens, and both.
# draft_vocab_eager: the draft vocabulary with the target's logits materialised (loss.lazy_target_logits=false).
STEP_EXTRA = ("chunked", "draft_vocab", "draft_vocab_chunked", "draft_vocab_eager")
SCOPES = ("loss", "step")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--anchors", type=int, default=16)
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--ctx", type=int, default=96, help="sequence length of the random target features")
    ap.add_argument("--markov-rank", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=0, help="lean loss rows per chunk (0 = auto)")
    ap.add_argument(
        "--draft-vocab", type=int, default=0, help="d of the draft-vocabulary variants (0 = skip them)"
    )
    ap.add_argument("--variants", default="", help="comma list of step variants to run (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scopes", default="loss,step")
    ap.add_argument("--out", default="outputs/bench_train_step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--_measure", nargs=2, metavar=("SCOPE", "VARIANT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- workloads
class Workload:
    """Fixed random inputs for one scope; ``run(impl)`` does forward + backward and returns (loss, grads)."""

    def __init__(self, args, scope: str):
        self.args, self.scope = args, scope
        dev = torch.device(args.device)
        g = torch.Generator().manual_seed(args.seed)
        b, a, gam, v = args.batch, args.anchors, args.block, args.vocab
        self.denom = None
        if scope == "loss":
            self.logits = (torch.randn(b, a, gam, v, generator=g) * 2).to(dev)
            self.tgt = (torch.randn(b, a, gam, v, generator=g) * 2).to(dev)
            self.conf = torch.randn(b, a, gam, generator=g).to(dev)
            labels = torch.randint(0, v, (b, a, gam), generator=g).to(dev)
            valid = torch.ones(b, a, gam, device=dev)
            self.targets = BlockTargets(labels, valid, labels, labels)
        else:
            self._build_step(g, dev)
        self.denom = weighted_valid(self.targets.valid, 4.0).sum()

    def _build_step(self, g, dev):
        from deepspec.models import build_drafter
        from deepspec.models.config import DrafterSpec

        a = self.args
        h = a.hidden
        c = DrafterSpec(
            model_type="qwen3",
            vocab_size=a.vocab,
            hidden_size=h,
            intermediate_size=2 * h,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=h // 4,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            attention_bias=False,
            use_qk_norm=True,
            num_layers=2,
            num_target_layers=6,
            target_hidden_size=h,
            target_layer_ids=[1, 2, 3],
            block_size=a.block,
            mask_token_id=a.vocab - 1,
            markov_rank=a.markov_rank,
        )
        torch.manual_seed(a.seed)
        self.model = build_drafter(c)
        self.model.init_weights(std=0.02, seed=a.seed)
        emb = torch.randn(a.vocab, h, generator=g) * 0.5
        head = torch.randn(a.vocab, h, generator=g) * 0.5
        self.model.load_target_head(emb, head)
        with torch.no_grad():  # a non-trivial Markov head (it starts at zero)
            self.model.markov_head.markov_w2.weight.copy_(
                torch.randn(a.vocab, a.markov_rank, generator=g) * 0.05
            )
        self.model.to(dev).train()
        if a.draft_vocab:
            # The same drafter with a draft vocabulary: the lm_head and W2 rows of d target tokens.
            import dataclasses

            self.pruned = build_drafter(dataclasses.replace(c, draft_vocab_size=a.draft_vocab))
            self.draft_ids = torch.randperm(a.vocab - 1, generator=g)[: a.draft_vocab].sort().values
            self.pruned.set_draft_vocab(self.draft_ids)
            self.pruned.load_target_head(emb, head)
            full = self.model.state_dict()
            w2_key = "markov_head.markov_w2.weight"
            self.pruned.load_state_dict(
                {k: (v[self.draft_ids] if k in (w2_key, "lm_head.weight") else v) for k, v in full.items()}
                | {"d2t": self.pruned.d2t, "t2d": self.pruned.t2d}
            )
            self.pruned.freeze_target_head()
            self.pruned.to(dev).train()
            self.draft_ids = self.draft_ids.to(dev)
        self.t_head = torch.nn.Linear(h, a.vocab, bias=False).to(dev)
        with torch.no_grad():
            self.t_head.weight.copy_((torch.randn(a.vocab, h, generator=g) * 0.5).to(dev))
        self.t_head.weight.requires_grad_(False)
        L = a.ctx
        self.ids = torch.randint(0, a.vocab - 1, (a.batch, L), generator=g).to(dev)
        self.feats = torch.randn(a.batch, L, 3 * h, generator=g).to(dev)
        self.final = torch.randn(a.batch, L, h, generator=g).to(dev)
        if L < a.anchors + a.block + 1:
            raise SystemExit(f"--ctx {L} is too short for {a.anchors} anchors and block {a.block}")
        anchors = torch.stack(
            [torch.randperm(L - a.block - 1, generator=g)[: a.anchors].sort().values for _ in range(a.batch)]
        ).to(dev)
        self.anchors = anchors
        self.targets = block_targets(
            self.ids, torch.ones_like(self.ids), anchors, torch.ones_like(anchors), a.block
        )

    def run(self, variant: str, want_grads: bool = False):
        impl = "reference" if variant == "reference" else "lean"
        cfg = LossConfig(impl=impl, chunk_size=self.args.chunk)
        if self.scope == "loss":
            z = self.logits.detach().requires_grad_(True)
            c = self.conf.detach().requires_grad_(True)
            out = dspark_loss(z, c, self.tgt, self.targets, cfg, self.denom)
            out.loss.backward()
            grads = {"draft_logits": z.grad, "confidence_logits": c.grad} if want_grads else None
            loss = float(out.loss.detach())
            del out, z, c
            return loss, grads
        pruned = variant.startswith("draft_vocab")
        m = self.pruned if pruned else self.model
        for p in m.parameters():
            p.grad = None
        chunked = variant in ("chunked", "draft_vocab_chunked")
        out = m(self.feats, self.ids, self.anchors, self.targets.prev_tokens, chunked_head=chunked)
        # As the training loop does with loss.lazy_target_logits=true: hidden + lm_head, per chunk.
        lazy = variant not in ("reference", "lean", "draft_vocab_eager")
        tgt = target_logits(self.final, self.targets.target_pos, self.t_head, lazy=lazy)
        ids = self.draft_ids if pruned else None
        lo = dspark_loss(out.logits, out.confidence_logits, tgt, self.targets, cfg, self.denom, draft_ids=ids)
        lo.loss.backward()
        loss = float(lo.loss.detach())
        del out, tgt, lo
        grads = (
            {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
            if want_grads
            else None
        )
        if not want_grads:
            for p in m.parameters():
                p.grad = None
        return loss, grads


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_peak(args, scope: str, impl: str) -> dict:
    """Peak bytes allocated during one forward+backward (after a warm-up call)."""
    import gc

    w = Workload(args, scope)
    w.run(impl)  # warm-up: one-off allocations (thread pools, kernels) are not the loss's
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        w.run(impl)
        torch.cuda.synchronize()
        return {
            "peak_bytes": torch.cuda.max_memory_allocated() - before,
            "method": "torch.cuda.max_memory_allocated",
        }
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        method = "peak RSS (VmHWM reset via /proc/self/clear_refs)"
        before = _status_kb("VmRSS")
        w.run(impl)
        peak = _status_kb("VmHWM")
    except OSError:  # no clear_refs: fall back to ru_maxrss (includes the warm-up, still per process)
        import resource

        method = "ru_maxrss (includes warm-up)"
        before = _status_kb("VmRSS")
        w.run(impl)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": (peak - before) * 1024, "method": method}


def peak_in_subprocess(args, scope: str, impl: str) -> dict:
    if args.device.startswith("cuda"):
        return measure_peak(args, scope, impl)  # the CUDA allocator counts exactly, in-process is fine
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    argv = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--_measure", scope, impl]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def max_rel(a: dict, b: dict) -> float:
    return max(
        float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-30))
        for k in a
    )


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args._measure:
        print(json.dumps(measure_peak(args, *args._measure)))
        return {}
    n_rows = args.batch * args.anchors * args.block
    unit = n_rows * args.vocab * 4
    results = {
        "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "rows": n_rows,
        "fp32_row_tensor_bytes": unit,
        "machine": machine(args),
        "scopes": {},
    }
    lines = [
        f"# train-step bench: V={args.vocab:,}, hidden {args.hidden}, B·A·γ = {args.batch}·{args.anchors}·"
        f"{args.block} = {n_rows} rows; one fp32 [rows, V] tensor = {unit / 2**20:.0f} MiB",
        f"machine: {results['machine']}",
        "",
        "| scope | impl | wall median s | wall min s | CPU median s | head GFLOP/s | peak MiB | peak / [rows,V] fp32 | |Δloss| | max |Δgrad| (rel) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scope in args.scopes.split(","):
        variants = VARIANTS if scope == "step" else VARIANTS[:2]
        if scope == "step" and args.draft_vocab:
            variants = VARIANTS + STEP_EXTRA
        if scope == "step" and args.variants:
            variants = tuple(v for v in variants if v in args.variants.split(",") or v == "reference")
        w = Workload(args, scope)
        ref_loss, ref_grads = w.run("reference", want_grads=True)
        eq = {}
        for v in variants[1:]:
            if v.startswith("draft_vocab"):
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
                _sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                w.run(v)
                _sync(args.device)
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        del w
        mem = {v: peak_in_subprocess(args, scope, v) for v in variants}
        s = {
            "equality": eq,
            "time_s": times,
            "cpu_time_s": cpu,
            "median_s": {k: statistics.median(v) for k, v in times.items()},
            "median_cpu_s": {k: statistics.median(v) for k, v in cpu.items()},
            "peak_bytes": {k: m["peak_bytes"] for k, m in mem.items()},
            "memory_method": mem["lean"]["method"],
            "ratios_vs_reference": {},
        }
        if scope == "step":
            s["head_gflop"] = {v: head_flops(args, v) / 1e9 for v in variants}
            s["gflop_per_s"] = {v: s["head_gflop"][v] / s["median_s"][v] for v in variants}
            base = "lean_lazy" if "lean_lazy" in variants else None
            if base:
                s["ratios_vs_lean_lazy"] = {
                    v: {
                        "wall_time": s["median_s"][v] / s["median_s"][base],
                        "peak_memory": s["peak_bytes"][v] / max(s["peak_bytes"][base], 1),
                    }
                    for v in variants
                    if v != base
                }
        for v in variants[1:]:
            s["ratios_vs_reference"][v] = {
                "wall_time": s["median_s"][v] / s["median_s"]["reference"],
                "cpu_time": s["median_cpu_s"][v] / s["median_cpu_s"]["reference"],
                "peak_memory": s["peak_bytes"][v] / max(s["peak_bytes"]["reference"], 1),
            }
        results["scopes"][scope] = s
        for v in variants:
            pb = s["peak_bytes"][v]
            e = eq.get(v)
            diff = (
                f"{e['abs_loss_diff']:.1e} | {e['max_abs_grad_diff']:.1e} ({e['max_rel_grad_diff']:.1e})"
                if e
                else "- | -"
            )
            gf = f"{s['gflop_per_s'][v]:.0f}" if "gflop_per_s" in s else "-"
            lines.append(
                f"| {scope} | {v} | {s['median_s'][v]:.3f} | {min(times[v]):.3f} | "
                f"{s['median_cpu_s'][v]:.3f} | {gf} | {pb / 2**20:.0f} | {pb / unit:.2f} | {diff} |"
            )
            print(lines[-1], flush=True)
    lines.append("")
    for scope, s in results["scopes"].items():
        for v, r in s["ratios_vs_reference"].items():
            lines.append(
                f"- {scope}, {v} / reference: wall time ×{r['wall_time']:.2f} (CPU time ×{r['cpu_time']:.2f}), "
                f"peak memory ×{r['peak_memory']:.2f}"
            )
        for v, r in s.get("ratios_vs_lean_lazy", {}).items():
            lines.append(
                f"- {scope}, {v} / lean_lazy (today's leanest full-vocabulary step): wall time "
                f"×{r['wall_time']:.2f}, peak memory ×{r['peak_memory']:.2f}"
            )
    lines.append(f"- memory: {mem['lean']['method']}")
    lines.append(
        "- head GFLOP/s: the step's nominal head matmul FLOPs (draft logits + Markov bias + target logits "
        "forward, their gradients backward; recomputation not counted) over the median wall time"
    )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train_step.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench_train_step.md").write_text(table + "\n")
    return results


def head_flops(args, variant: str) -> float:
    """Nominal head FLOPs of one step: forward 2N·d·(H + r) (draft logits + Markov bias) + 2N·V·H
    (target logits); backward 2N·d·(H + 2r) (dh, dz, dW2). N = block positions, d = output rows."""
    n = args.batch * args.anchors * args.block
    d = args.draft_vocab if variant.startswith("draft_vocab") else args.vocab
    h, r = args.hidden, args.markov_rank
    return 2.0 * n * (d * (h + r) + args.vocab * h + d * (h + 2 * r))


def machine(args) -> str:
    from deepspec.machine import cpu_name

    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores visible, {args.threads} torch threads (torch {torch.__version__})"


if __name__ == "__main__":
    main()
