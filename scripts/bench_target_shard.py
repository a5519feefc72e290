"""Per-rank memory of the frozen target with 2 processes, whole (``target.shard=none``) vs sharded
(``target.shard=fsdp``), on a random Qwen3 target of a few hundred MB (CPU, gloo).

    python scripts/bench_target_shard.py            # writes docs/results/bench_target_shard.{json,md}

The target is saved once as safetensors; each mode is its own ``torchrun --nproc_per_node 2`` launch
loading it the way training does (whole: ``TargetModel.from_pretrained``; sharded:
``deepspec.target.shard_load.load_sharded_target``, each rank reading only its rows), so peak RSS is
that mode's alone, loading included. Per rank it records the target's parameter bytes (a shard's
local part), the resident set after loading, the peak resident set after loading and overall, and
the time of one target forward; the orchestrator checks that both modes give the same features.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
NAME = "bench_target_shard"
# ~143M parameters, 0.57 GB in fp32: big enough that the weights dominate a process's memory.
TARGET = dict(
    vocab_size=32768,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=64,
    tie_word_embeddings=False,
)
LAYER_IDS = [1, 3, 5]
BATCH, SEQ, REPEATS = 2, 256, 3


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(mode: str, folder: Path, out: Path) -> None:
    import gc

    import accelerate  # noqa: F401  (imported before the baseline: the code is not the target's memory)
    import torch
    import torch.distributed as dist
    import transformers.models.qwen3.modeling_qwen3  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from deepspec.target.adapter import TargetModel
    from deepspec.target.shard_load import load_sharded_target
    from deepspec.target.sharding import local_param_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    rss_start = _rss_mb()
    if mode == "fsdp":
        target = load_sharded_target(str(folder), LAYER_IDS)
    else:
        target = TargetModel.from_pretrained(str(folder), LAYER_IDS)
    # A DTensor's numel() is its global size: the whole target's bytes in both modes.
    full_bytes = sum(p.numel() * p.element_size() for p in target.model.parameters())
    gc.collect()
    rss_loaded = _rss_mb()
    peak_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x = torch.randint(0, TARGET["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    times = []
    for _ in range(REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        feats = target(x)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        torch.save({"aux": feats.aux, "final": feats.final}, out.with_suffix(".pt"))
    row = {
        "rank": rank,
        "param_bytes": local_param_bytes(target.model),
        "full_param_bytes": full_bytes,
        "rss_before_load_mb": rss_start,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_after_load_mb": peak_loaded,  # the peak of loading alone
        "rss_after_forward_mb": _rss_mb(),  # after REPEATS forwards (gathered layers freed again)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "forward_s": min(times),
    }
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        out.write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def save_target(folder: Path) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**TARGET)).save_pretrained(str(folder))


def launch(mode: str, folder: Path, out: Path) -> list:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [__file__, "--worker", mode, "--target", str(folder), "--out", str(out)]
    # A fixed mmap threshold makes glibc hand freed large blocks (a gathered layer) back to the OS, so
    # RSS shows live memory rather than what the allocator keeps after its dynamic threshold rose.
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
    }
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} run failed:\n{(r.stdout + r.stderr)[-4000:]}")
    return json.loads(out.read_text())


def table(res: dict) -> str:
    rows = [
        "| target.shard | rank | target params (MB) | share of whole | RSS before load (MB) | RSS after load "
        "(MB) | peak RSS after load (MB) | RSS after forwards (MB) | peak RSS (MB) | forward (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in ("none", "fsdp"):
        for r in res["modes"][mode]:
            rows.append(
                f"| {mode} | {r['rank']} | {r['param_bytes'] / 2**20:.1f} | "
                f"{r['param_bytes'] / r['full_param_bytes']:.3f} | {r['rss_before_load_mb']:.0f} | "
                f"{r['rss_after_load_mb']:.0f} | {r['peak_rss_after_load_mb']:.0f} | "
                f"{r['rss_after_forward_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['forward_s']:.2f} |"
            )
    return "\n".join(rows)


def summarise(res: dict) -> str:
    """Ratios sharded / whole (rank 0), RSS net of the process's memory before the target loaded."""
    whole, shard = (res["modes"][m][0] for m in ("none", "fsdp"))

    def net(r, key):
        return r[key] - r["rss_before_load_mb"]

    res["param_bytes_ratio"] = shard["param_bytes"] / whole["param_bytes"]
    res["target_rss_ratio"] = net(shard, "rss_after_forward_mb") / net(whole, "rss_after_forward_mb")
    res["peak_rss_ratio"] = net(shard, "peak_rss_mb") / net(whole, "peak_rss_mb")
    res["sharded_load_peak_over_steady"] = net(shard, "peak_rss_after_load_mb") / net(
        shard, "rss_after_load_mb"
    )
    res["forward_time_ratio"] = shard["forward_s"] / whole["forward_s"]
    return (
        f"{table(res)}\n\nSharded / whole, per rank: parameter bytes {res['param_bytes_ratio']:.3f}; resident "
        f"memory of the target after the forwards (RSS minus RSS before loading) {res['target_rss_ratio']:.2f}; "
        f"peak over loading and forwards (same baseline) {res['peak_rss_ratio']:.2f}; the sharded load's "
        f"own peak is {res['sharded_load_peak_over_steady']:.2f}x the memory it leaves (each rank reads only "
        f"its rows of every weight, straight into its shard); forward time {res['forward_time_ratio']:.2f}x (all-gathers over "
        f"gloo); features max |diff| {res['features_max_abs_diff']:.3g}.\n"
    )


def write(res: dict, results: Path) -> str:
    from deepspec import atomic

    md = summarise(res)
    results.mkdir(parents=True, exist_ok=True)
    atomic.write_json(results / f"{NAME}.json", res)
    atomic.write_text(results / f"{NAME}.md", md)
    return md


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=("none", "fsdp"))
    p.add_argument("--target", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.target, a.out)
    res = {"target": TARGET, "layer_ids": LAYER_IDS, "batch": [BATCH, SEQ], "processes": 2, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "target"
        save_target(folder)
        feats = {}
        for mode in ("none", "fsdp"):
            out = Path(tmp) / f"{mode}.json"
            res["modes"][mode] = launch(mode, folder, out)
            feats[mode] = torch.load(out.with_suffix(".pt"), weights_only=True)
        res["features_max_abs_diff"] = max(
            float((feats["none"][k] - feats["fsdp"][k]).abs().max()) for k in ("aux", "final")
        )
    print(write(res, a.results))


if __name__ == "__main__":
    main()
