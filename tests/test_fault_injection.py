"""Kill at each write point of train, export, collect and regenerate (DEEPSPEC_FAULTS, see
deepspec/training/faults.py), rerun: the result is the uninterrupted run's, with no duplicate or
missing metrics step and no temporary folder left (docs/guarantees.md). The kills inside and right
after a checkpoint are in tests/test_resume.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from openai_standin import StandIn
from test_cache import COLLECT, accelerator, bf16_cache, compose  # noqa: F401  (bf16_cache: a fixture)
from test_regenerate import openai_cfg
from train_fixtures import (
    assert_same_tensors,
    launch,
    micro_overrides,
    tail,
    train_here,
)

ROOT = Path(__file__).resolve().parents[1]
RUN = ["train.max_steps=4", "train.checkpoint.every=2", "train.checkpoint.keep_last=5"]
TIMING = {"tokens_per_s", "peak_mem_gb"}  # wall-clock and memory readings, not results
TEMP = (".tmp-", ".trash-", ".staging-", ".old-", ".tmp", "run.lock", "corrupt-")


def _leftovers(root: Path) -> list:
    return [p.relative_to(root).as_posix() for p in root.rglob("*") if any(t in p.name for t in TEMP)]


def _loss_steps(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train_here(micro_overrides(tiny_cache, out) + RUN)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault", ["kill_after_commit@0", "kill_after_metrics@3", "kill_after_drafter@0", "kill_in_export@0"]
)
def test_train_killed_at_a_write_point_then_rerun(fault, reference, tiny_cache, tmp_path):
    out = tmp_path / "run"
    r = launch(micro_overrides(tiny_cache, out) + RUN, env={"DEEPSPEC_FAULTS": fault})
    assert r.returncode == -signal.SIGKILL, tail(r)
    train_here(micro_overrides(tiny_cache, out) + RUN)
    for f in (
        "drafter/model.safetensors",
        "drafter/deepspec/extra.safetensors",
        "export/speculators/model.safetensors",
        "export/speculators/deepspec/extra.safetensors",
    ):
        assert_same_tensors(out / f, reference / f, exact=True)
    assert (out / "export/speculators/config.json").read_text() == (
        reference / "export/speculators/config.json"
    ).read_text()
    assert _loss_steps(out) == [1, 2, 3, 4]
    summary, ref = (json.loads((d / "train_summary.json").read_text()) for d in (out, reference))
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
    assert strip(summary["final_metrics"]) == strip(ref["final_metrics"])
    assert summary["train_steps"] == 4
    assert _leftovers(out) == [] and _leftovers(out.parent) == []


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_in_export@0", "kill_in_export_swap@0"])
def test_export_killed_then_rerun(fault, reference, tmp_path):
    exp = tmp_path / "exp"
    args = [
        sys.executable,
        str(ROOT / "deepspec" / "export.py"),
        f"export.checkpoint={reference}",
        f"export.output_dir={exp}",
        "export.format=native",
        "export.overwrite=true",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("DEEPSPEC_FAULTS", None)
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _tree(exp)
    killed = subprocess.run(args, env={**env, "DEEPSPEC_FAULTS": fault}, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert _leftovers(tmp_path) != []  # the kill left its temporary folder
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _tree(exp) == before
    assert _leftovers(tmp_path) == []


def _tree(d: Path) -> dict:
    """Every file below ``d`` (the export's subfolder for deepspec-only weights included), by path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_in_shard@3", "kill_before_sidecar@3", "kill_before_manifest@0"])
def test_collect_killed_at_a_write_point_then_rerun(fault, bf16_cache, micro_target, tmp_path):  # noqa: F811
    from deepspec.data.collector import collect

    _, _, micro = micro_target
    out = tmp_path / "cache"
    overrides = micro + COLLECT + [f"collect.cache_dir={out}", "collect.dtype=bf16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DEEPSPEC_FAULTS": fault}
    r = subprocess.run(
        [sys.executable, str(ROOT / "deepspec" / "collect.py"), *overrides], env=env, capture_output=True
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collect(compose("collect", overrides), accelerator(), progress_bar=False)
    finally:
        torch.set_num_threads(n)
    assert _snapshot(out) == _snapshot(bf16_cache)
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill_in_record@5", "kill_after_record@5"])
def test_regenerate_killed_at_a_write_point_then_resumed(fault, tmp_path):
    from deepspec.data.regenerate import regenerate

    server = StandIn()
    try:
        regenerate(openai_cfg(tmp_path, [server.url], n=12, out="ref.jsonl"), progress_bar=False)
        out = tmp_path / "killed.jsonl"
        args = [
            sys.executable,
            str(ROOT / "deepspec" / "regenerate.py"),
            f"regen.input={tmp_path / 'prompts.jsonl'}",
            f"regen.output={out}",
            "regen.backend=openai",
            f"regen.urls=[{server.url}]",
            "regen.model=tiny-served",
            "regen.backoff_s=0.01",
            "regen.max_retries=3",
            "data.enable_thinking=false",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(args, cwd=tmp_path, env={**env, "DEEPSPEC_FAULTS": fault}, capture_output=True)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        res = subprocess.run(args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        server.close()
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert (tmp_path / "killed.errors.jsonl").read_bytes() == (tmp_path / "ref.errors.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
