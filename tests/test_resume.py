"""Interruption: a run SIGKILLed after a checkpoint, or while writing one, resumes to the same weights
as an uninterrupted run (same world size, CPU: bit for bit); retention keeps last-K plus best."""

from __future__ import annotations

import json
import signal

import pytest
from train_fixtures import (
    assert_same_tensors,
    ckpt,
    launch,
    micro_overrides,
    state,
    tail,  # noqa: F401
    train_here,
)

RUN = ["train.max_steps=4", "train.checkpoint.every=2", "train.checkpoint.keep_last=5"]
COMPARED = ["model.safetensors", "optimizer.safetensors", "rng/rank-00000.safetensors"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train_here(micro_overrides(tiny_cache, out) + RUN)
    return out


def assert_same_run(out, ref):
    for f in COMPARED:
        assert_same_tensors(ckpt(out, 4) / f, ckpt(ref, 4) / f, exact=True)
    assert (ckpt(out, 4) / "scheduler.json").read_text() == (ckpt(ref, 4) / "scheduler.json").read_text()
    assert_same_tensors(
        out / "drafter" / "model.safetensors", ref / "drafter" / "model.safetensors", exact=True
    )
    a, b = state(out, 4), state(ref, 4)
    for key in ("step", "adam_step", "data", "heldout"):
        assert a[key] == b[key], key
    timing = {"tokens_per_s", "peak_mem_gb"}  # wall-clock and memory readings, not training state
    assert {k: v for k, v in a["metrics"].items() if k not in timing} == {
        k: v for k, v in b["metrics"].items() if k not in timing
    }
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert steps == [1, 2, 3, 4]  # the resumed run does not log a step twice


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_is_bit_identical(uninterrupted, tiny_cache, tmp_path):
    out = tmp_path / "run"
    r = launch(micro_overrides(tiny_cache, out) + RUN, env={"DEEPSPEC_FAULTS": "kill_after_checkpoint@2"})
    assert r.returncode == -signal.SIGKILL, tail(r)
    assert (ckpt(out, 2) / "trainer_state.json").is_file() and not ckpt(out, 4).exists()
    assert not (out / "drafter").exists()
    train_here(micro_overrides(tiny_cache, out) + RUN)  # train.resume=auto is the default
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_checkpoint_write_killed_midway_leaves_previous_usable(uninterrupted, tiny_cache, tmp_path):
    from deepspec.training.checkpoint import find_checkpoint, list_checkpoints

    out = tmp_path / "run"
    r = launch(micro_overrides(tiny_cache, out) + RUN, env={"DEEPSPEC_FAULTS": "kill_in_checkpoint@4"})
    assert r.returncode == -signal.SIGKILL, tail(r)
    (partial,) = (out / "checkpoints").glob(".step-00000004.staging-*")
    assert (partial / "model.safetensors").is_file() and not (partial / "trainer_state.json").exists()
    assert not ckpt(out, 4).exists()
    assert [c.step for c in list_checkpoints(out / "checkpoints")] == [2]
    assert find_checkpoint("auto", out / "checkpoints") == ckpt(out, 2)
    train_here(micro_overrides(tiny_cache, out) + RUN)
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert not partial.exists()  # the stale partial write is cleaned up
    assert_same_run(out, uninterrupted)


def _fake_checkpoint(root, step, tau):
    d = root / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(
        json.dumps({"step": step, "heldout": None if tau is None else {"tau_est": tau}})
    )
    return d


def test_retention_keeps_last_k_plus_best(tmp_path):
    from deepspec.training.checkpoint import find_checkpoint, list_checkpoints, prune_checkpoints

    for step, tau in [(10, 3.0), (20, 4.5), (30, 4.0), (40, 3.5), (50, None)]:
        _fake_checkpoint(tmp_path, step, tau)
    (tmp_path / "step-00000060").mkdir()  # no trainer_state.json: incomplete, never counted or resumed
    index = prune_checkpoints(tmp_path, keep_last=2, keep_best=True)
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert index["best"] == "step-00000020" and index["latest"] == "step-00000050"
    assert find_checkpoint("auto", tmp_path).name == "step-00000050"
    assert find_checkpoint("none", tmp_path) is None
    prune_checkpoints(tmp_path, keep_last=1, keep_best=False)
    assert [c.step for c in list_checkpoints(tmp_path)] == [50]
    assert not list(tmp_path.glob(".*"))  # nothing renamed aside is left
