"""A run directory is written only by the run that owns it, keeps its record, and never holds a secret:
refused starts leave it byte for byte, a lock keeps a second training out (and a dead one's lock is
taken over), re-running a finished run keeps its training record, a bit-flipped checkpoint is skipped
for the previous good one, changed hyperparameters on resume are applied and reported
(docs/guarantees.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import (
    TRAIN_PY,
    assert_same_tensors,
    ckpt,
    launch,
    micro_overrides,
    tail,
    train_here,
)

SECRET = "sk-h5secretvalue0123456789"
RUN = ["train.max_steps=4", "train.checkpoint.every=2", "train.checkpoint.keep_last=5"]


def _hashes(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory):
    """A finished run made through the command line (Hydra included), with a credential given."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = launch(micro_overrides(tiny_cache, out) + RUN + [f"regen.api_key={SECRET}"])
    assert r.returncode == 0, tail(r)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


@pytest.mark.slow
def test_refused_starts_leave_the_run_byte_identical(finished, tiny_cache, tmp_path):
    out = _copy(finished, tmp_path)
    before = _hashes(out)
    assert ".hydra/overrides.yaml" in before and "config.yaml" in before and "train.log" in before
    for refused, words in (
        (["train.resume=none", "train.lr=5e-5"], "already holds checkpoints"),
        (["model.num_layers=1"], "different drafter config"),
    ):
        r = launch(micro_overrides(tiny_cache, out) + RUN + refused)
        assert r.returncode != 0 and words in r.stdout + r.stderr, tail(r)
        assert _hashes(out) == before, refused  # config.yaml, .hydra/*, run_info.json, train.log untouched


@pytest.mark.slow
def test_secrets_are_written_nowhere(finished):
    leaks = [p for p in finished.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []
    overrides = (finished / ".hydra" / "overrides.yaml").read_text()
    assert "regen.api_key=<redacted>" in overrides  # that one was set is recorded
    assert "api_key: <redacted>" in (finished / "config.yaml").read_text()
    assert "api_key: <redacted>" in (ckpt(finished, 4) / "config.yaml").read_text()


@pytest.mark.slow
def test_rerunning_a_finished_run_keeps_its_training_record(finished, tiny_cache, tmp_path):
    out = _copy(finished, tmp_path)
    first = json.loads((out / "train_summary.json").read_text())
    assert first["final_metrics"]["loss"] > 0 and first["train_time_s"] > 0
    train_here(micro_overrides(tiny_cache, out) + RUN)  # the documented re-evaluate / re-export flow
    again = json.loads((out / "train_summary.json").read_text())
    for key in ("final_metrics", "train_time_s", "train_steps", "resumed_from_step"):
        assert again[key] == first[key], key
    assert len(again["reruns"]) == 1 and again["reruns"][0]["export"].endswith("speculators")


@pytest.mark.slow
def test_bit_flipped_newest_checkpoint_is_skipped_for_the_previous_one(
    finished, tiny_cache, tmp_path, caplog
):
    out = _copy(finished, tmp_path)
    (out / "train_summary.json").unlink()
    shutil.rmtree(out / "drafter")
    f = ckpt(out, 4) / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x40  # same size, one bit in a weight's exponent
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="deepspec"):
        train_here(micro_overrides(tiny_cache, out) + RUN)
    said = caplog.text
    assert "step-00000004 is corrupted: model.safetensors does not match its recorded sha256" in said
    assert "resumed from the previous good checkpoint" in said and "step-00000002" in said
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == 2
    assert (out / "checkpoints" / "corrupt-step-00000004").is_dir()  # kept for inspection
    # Re-trained from step 2: the same weights as the uninterrupted run, bit for bit.
    assert_same_tensors(out / "drafter" / "model.safetensors", finished / "drafter" / "model.safetensors")


@pytest.mark.slow
def test_resume_applies_a_changed_lr_and_length(tiny_cache, tmp_path, caplog):
    from deepspec.training.optim import lr_factor

    out = tmp_path / "run"
    base = micro_overrides(tiny_cache, out) + ["train.warmup_ratio=0.25"]
    train_here(base + ["train.max_steps=2"])
    with caplog.at_level(logging.INFO, logger="deepspec"):
        train_here(base + ["train.max_steps=4", "train.lr=1e-4"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in rows if "lr" in r}
    # metrics step s logs the lr of optimizer step s-1 (0-based): the new peak, the new length.
    assert lrs[3] == pytest.approx(1e-4 * lr_factor(2, 4, 0.25), rel=1e-12)
    assert lrs[4] == pytest.approx(1e-4 * lr_factor(3, 4, 0.25), rel=1e-12)
    said = caplog.text
    assert "train.lr 0.001 -> 0.0001" in said and "optimizer steps 2 -> 4 (lr schedule re-planned)" in said
    assert "continuing at step 2/4 with lr" in said
    assert "lr: 0.0001" in (out / "config.yaml").read_text()  # config.yaml states what the run uses


@pytest.mark.slow
def test_a_second_training_is_refused_and_a_dead_ones_lock_taken_over(tiny_cache, tmp_path, caplog):
    from deepspec.training.run_dir import RunLockedError

    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, TRAIN_PY, *micro_overrides(tiny_cache, out), "train.max_steps=400"],
        env={**os.environ, "PYTHONPATH": str(Path(TRAIN_PY).parents[1]), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "run.lock").exists():
            assert first.poll() is None and time.time() < deadline, "the first training never took its lock"
            time.sleep(0.2)
        with pytest.raises(
            RunLockedError, match=f"in use by another training \\(process {first.pid} on this host"
        ):
            train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=2"])
        assert first.poll() is None  # the first one runs on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((out / "run.lock").read_text())["pid"] == first.pid  # a dead process's lock is left
    with caplog.at_level(logging.WARNING, logger="deepspec"):
        train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=2"])
    assert f"taking over the stale lock of {out}: process {first.pid}" in caplog.text
    assert not (out / "run.lock").exists()  # released at the end
    assert (out / "train_summary.json").is_file()
