"""Workloads and measurements of scripts/bench_train_step.py: fixed random inputs, one forward +
backward per call, peak memory in a fresh process, nominal head FLOPs."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deepspec.config import LossConfig  # noqa: E402
from deepspec.data.anchors import BlockTargets, block_targets  # noqa: E402
from deepspec.losses import dspark_loss, target_logits, weighted_valid  # noqa: E402

# Step variants: (draft vocabulary?, loss.lazy_target_logits, loss.chunked_head). "reference" is
# loss.impl=reference; every other variant is the lean loss.
STEP_VARIANTS = {
    "reference": (False, False, False),
    "lean": (False, False, False),  # today's default
    "lean_lazy": (False, True, False),  # today's leanest full-vocabulary step: the baseline
    "fused": (False, True, True),  # the chunked head, gradients formed in the forward
    "draft_vocab_fused": (True, True, True),
    # Not run by default (--variants): the chunked head recomputing its logits in backward (the path
    # before gradients were formed in the forward), and the draft vocabulary on the lean loss.
    "chunked_recompute": (False, True, True),
    "draft_vocab": (True, True, False),
    "draft_vocab_eager": (True, False, False),
}
DEFAULT_STEP = ("reference", "lean", "lean_lazy", "fused", "draft_vocab_fused")


@contextlib.contextmanager
def _without_forward_grads():
    """The chunked head as it was before it formed gradients in its forward: no row weights reach it,
    so its backward recomputes every chunk's logits."""
    import deepspec.losses.chunked_head as ch

    orig = ch.factored_row_stats

    def no_weights(f, tgt, labels, active, chunk_rows, with_soft_ce, vocab, row_weights=None):
        return orig(f, tgt, labels, active, chunk_rows, with_soft_ce, vocab, None)

    ch.factored_row_stats = no_weights
    try:
        yield
    finally:
        ch.factored_row_stats = orig


class Workload:
    """Fixed random inputs for one scope; ``run(variant)`` does forward + backward and returns (loss, grads)."""

    def __init__(self, args, scope: str, anchors: int):
        self.args, self.scope, self.num_anchors = args, scope, anchors
        dev = torch.device(args.device)
        g = torch.Generator().manual_seed(args.seed)
        b, a, gam, v = args.batch, anchors, args.block, args.vocab
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

        a, h = self.args, self.args.hidden
        c = DrafterSpec(
            model_type="qwen3", vocab_size=a.vocab, hidden_size=h, intermediate_size=2 * h,
            num_attention_heads=4, num_key_value_heads=2, head_dim=h // 4, rms_norm_eps=1e-6,
            rope_theta=1e6, attention_bias=False, use_qk_norm=True, num_layers=2, num_target_layers=6,
            target_hidden_size=h, target_layer_ids=[1, 2, 3], block_size=a.block,
            mask_token_id=a.vocab - 1, markov_rank=a.markov_rank,
        )  # fmt: skip
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
        self.pruned = self.draft_ids = None
        if a.draft_vocab:
            # The same drafter with a draft vocabulary: the lm_head and W2 rows of d target tokens.
            self.pruned = build_drafter(dataclasses.replace(c, draft_vocab_size=a.draft_vocab))
            ids = torch.randperm(a.vocab - 1, generator=g)[: a.draft_vocab].sort().values
            self.pruned.set_draft_vocab(ids)
            self.pruned.load_target_head(emb, head)
            rows = ("markov_head.markov_w2.weight", "lm_head.weight")
            self.pruned.load_state_dict(
                {k: (v[ids] if k in rows else v) for k, v in self.model.state_dict().items()}
                | {"d2t": self.pruned.d2t, "t2d": self.pruned.t2d}
            )
            self.pruned.freeze_target_head()
            self.pruned.to(dev).train()
            self.draft_ids = ids.to(dev)
        self.t_head = torch.nn.Linear(h, a.vocab, bias=False).to(dev)
        with torch.no_grad():
            self.t_head.weight.copy_((torch.randn(a.vocab, h, generator=g) * 0.5).to(dev))
        self.t_head.weight.requires_grad_(False)
        L, na = a.ctx, self.num_anchors
        if L < na + a.block + 1:
            raise SystemExit(f"--ctx {L} is too short for {na} anchors and block {a.block}")
        self.ids = torch.randint(0, a.vocab - 1, (a.batch, L), generator=g).to(dev)
        self.feats = torch.randn(a.batch, L, 3 * h, generator=g).to(dev)
        self.final = torch.randn(a.batch, L, h, generator=g).to(dev)
        self.anchors = torch.stack(
            [torch.randperm(L - a.block - 1, generator=g)[:na].sort().values for _ in range(a.batch)]
        ).to(dev)
        self.targets = block_targets(
            self.ids, torch.ones_like(self.ids), self.anchors, torch.ones_like(self.anchors), a.block
        )

    def run(self, variant: str, want_grads: bool = False):
        cfg = LossConfig(impl="reference" if variant == "reference" else "lean", chunk_size=self.args.chunk)
        if self.scope == "loss":
            z = self.logits.detach().requires_grad_(True)
            c = self.conf.detach().requires_grad_(True)
            out = dspark_loss(z, c, self.tgt, self.targets, cfg, self.denom)
            out.loss.backward()
            grads = {"draft_logits": z.grad, "confidence_logits": c.grad} if want_grads else None
            return float(out.loss.detach()), grads
        pruned, lazy, chunked = STEP_VARIANTS[variant]
        m = self.pruned if pruned else self.model
        for p in m.parameters():
            p.grad = None
        ctx = _without_forward_grads() if variant == "chunked_recompute" else contextlib.nullcontext()
        with ctx:
            out = m(self.feats, self.ids, self.anchors, self.targets.prev_tokens, chunked_head=chunked)
            # As the training loop does: with lazy target logits the loss gets hidden + lm_head.
            tgt = target_logits(self.final, self.targets.target_pos, self.t_head, lazy=lazy)
            ids = self.draft_ids if pruned else None
            lo = dspark_loss(
                out.logits, out.confidence_logits, tgt, self.targets, cfg, self.denom, draft_ids=ids
            )
            del out, tgt
            lo.loss.backward()
        loss = float(lo.loss.detach())
        del lo
        grads = None
        if want_grads:
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        for p in m.parameters():
            p.grad = None
        return loss, grads


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_peak(args, scope: str, variant: str, anchors: int) -> dict:
    """Peak bytes allocated during one forward+backward (after a warm-up call)."""
    w = Workload(args, scope, anchors)
    w.run(variant)  # warm-up: one-off allocations (thread pools, kernels) are not the step's
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        w.run(variant)
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
        w.run(variant)
        peak = _status_kb("VmHWM")
    except OSError:  # no clear_refs: fall back to ru_maxrss (includes the warm-up, still per process)
        import resource

        method = "ru_maxrss (includes warm-up)"
        before = _status_kb("VmRSS")
        w.run(variant)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_bytes": (peak - before) * 1024, "method": method}


def peak_in_subprocess(args, scope: str, variant: str, anchors: int) -> dict:
    if args.device.startswith("cuda"):
        return measure_peak(args, scope, variant, anchors)  # the CUDA allocator counts exactly
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="65536",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    script = str(ROOT / "scripts" / "bench_train_step.py")
    argv = [sys.executable, script, *sys.argv[1:], "--_measure", scope, variant, str(anchors)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def head_flops(args, variant: str, anchors: int) -> float:
    """Nominal head FLOPs of one step: forward 2N·d·(H + r) (draft logits + Markov bias) + 2N·V·H
    (target logits); backward 2N·d·(H + 2r) (dh, dz, dW2). N = block positions, d = output rows.
    Recomputation (lazy target logits, the chunked head's backward) is not counted."""
    n = args.batch * anchors * args.block
    d = args.draft_vocab if STEP_VARIANTS.get(variant, (False,))[0] else args.vocab
    h, r = args.hidden, args.markov_rank
    return 2.0 * n * (d * (h + r) + args.vocab * h + d * (h + 2 * r))


def machine(args) -> str:
    from deepspec.machine import cpu_name

    if args.device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{cpu_name()}, {os.cpu_count()} cores visible, {args.threads} torch threads (torch {torch.__version__})"


def max_abs(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def max_rel(a: dict, b: dict) -> float:
    return max(
        float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp(min=1e-30))
        for k in a
    )
