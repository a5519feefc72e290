"""End to end with the command-line entry points, as a user runs them on a fresh clone:
prompts -> regenerate (the target answers) -> collect (fp8 cache) -> train from the cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, f"{args[0]} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


@pytest.mark.slow
def test_regenerate_collect_train(micro_target, tmp_path):
    from deepspec.data.tiny_chat import tiny_chat_splits

    _, tcfg, micro = micro_target
    pairs = tiny_chat_splits(tcfg)["train"][:40]
    with open(tmp_path / "prompts.jsonl", "w") as f:  # ShareGPT schema, prompts only
        for p in pairs:
            f.write(
                json.dumps(
                    {
                        "id": p["id"],
                        "conversations": [{"from": "human", "value": p["messages"][0]["content"]}],
                    }
                )
                + "\n"
            )

    run(
        [
            str(ROOT / "deepspec" / "regenerate.py"),
            *micro,
            "regen.input=prompts.jsonl",
            "regen.output=regen.jsonl",
            "regen.max_new_tokens=40",
            "regen.batch_size=8",
            "regen.device=cpu",
        ],
        tmp_path,
    )
    regen = [json.loads(x) for x in (tmp_path / "regen.jsonl").read_text().splitlines()]
    assert [r["id"] for r in regen] == [p["id"] for p in pairs]
    assert all(r["messages"][-1]["role"] == "assistant" for r in regen)

    out = run(
        [
            str(ROOT / "deepspec" / "collect.py"),
            *micro,
            "data.source=chat",
            "data.path=regen.jsonl",
            "data.heldout_fraction=0.1",
            "data.max_length=128",
            "collect.cache_dir=cache",
            "collect.dtype=fp8",
            "collect.shard_sequences=8",
        ],
        tmp_path,
    )
    assert "cache estimate:" in out and "bytes/token" in out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["storage_dtype"] == "fp8" and manifest["num_sequences"] >= 20
    assert manifest["bytes_per_token"] <= 0.55 * manifest["reference_bytes_per_token"]
    assert manifest["data"]["source"] == "chat" and manifest["heldout_records"] > 0

    run(
        [
            str(ROOT / "deepspec" / "train.py"),
            *micro,
            "data.source=cache",
            "data.cache_dir=cache",
            "data.max_length=128",
            "train.max_steps=8",
            "train.log_every=1",
            "eval.enabled=false",
            "train.output_dir=run",
            "train.progress_bar=false",
        ],
        tmp_path,
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in rows if "loss" in m]  # training rows; held-out rows carry heldout/* keys
    assert len(metrics) == 8 and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]  # it learns from the cached features
    assert (tmp_path / "run" / "drafter" / "model.safetensors").is_file()
