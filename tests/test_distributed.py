"""Two processes on CPU (gloo): DDP (torchrun) and DeepSpeed ZeRO-2 (accelerate launch with the shipped
config) train the micro tiny target and match a single-process run on the same global batch; a NaN
step is skipped identically under both; a 2-process checkpoint resumes on one process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launchers import TRAIN_PY, run_two_nodes, run_worker
from train_fixtures import (
    assert_same_tensors,
    ckpt,
    launch,
    micro_overrides,
    state,
    tail,
    tensors,  # noqa: F401
    train_here,
)

pytestmark = pytest.mark.slow

# Global batch 8 = 2 ranks x 2 micro x 2 accumulation (1 x 2 x 4 on one process). No clipping, so the
# AdamW moments after step 1 are the (scaled) gradient itself and any normalisation error shows; they
# must agree to 1e-5 of each tensor's scale. Weights get AdamW's m/(sqrt(v)+eps) update, which amplifies
# float noise on entries whose gradient is near eps (~1e-8), so they are compared to 1e-2 x lr.
WEIGHT_ATOL = 1e-5  # the tiny recipe's lr is 1e-3
# Gradients are sums in a different order on 2 ranks: a tensor whose entries are tiny next to the terms
# they cancel from (the Markov head's W2, zero-initialised, ~2e-5 after a step) carries ~1e-9 of absolute
# float noise, which is not a normalisation error (that would be a relative error of order 1).
MOMENT_ATOL = 1e-8
SPLIT = [
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.grad_clip=0",
    "train.checkpoint.every=1",
    "train.checkpoint.keep_last=10",
    "train.on_nonfinite=skip",
]


@pytest.fixture(scope="module")
def reference(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train_here(micro_overrides(tiny_cache, out) + SPLIT + ["train.max_steps=2"])
    return out


def two_process_run(tiny_cache, out, launcher, extra=()):
    # Three steps; step 3's loss is made NaN on every rank, so its update must be skipped.
    r = launch(
        micro_overrides(tiny_cache, out) + SPLIT + ["train.max_steps=3", *extra],
        launcher=launcher,
        env={"DEEPSPEC_FAULTS": "nan_loss@3"},
    )
    assert r.returncode == 0, tail(r)
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_cache, tmp_path_factory):
    return two_process_run(tiny_cache, tmp_path_factory.mktemp("ddp"), "torchrun")


@pytest.fixture(scope="module")
def zero2_run(tiny_cache, tmp_path_factory):
    return two_process_run(tiny_cache, tmp_path_factory.mktemp("zero2"), "deepspeed_zero2")


@pytest.fixture(scope="module")
def sharded_target_run(tiny_cache, tmp_path_factory):
    """DDP with the frozen target sharded over the 2 ranks (target.shard=fsdp)."""
    return two_process_run(tiny_cache, tmp_path_factory.mktemp("shard"), "torchrun", ["target.shard=fsdp"])


@pytest.mark.parametrize(
    "run_name, engine", [("ddp_run", "ddp"), ("zero2_run", "deepspeed"), ("sharded_target_run", "ddp")]
)
def test_two_processes_equal_one_process(run_name, engine, reference, request):
    out = request.getfixturevalue(run_name)
    st = state(out, 1)
    assert st["world_size"] == 2 and st["engine"] == engine
    assert st["zero_stage"] == (2 if engine == "deepspeed" else -1)
    assert state(reference, 1)["world_size"] == 1
    if run_name == "sharded_target_run":  # each rank held half of the target's weights
        info, ref_info = (json.loads((d / "run_info.json").read_text()) for d in (out, reference))
        assert (info["target_shard"], ref_info["target_shard"]) == ("fsdp", "none")
        ratio = info["target_param_bytes_per_rank"] / ref_info["target_param_bytes_per_rank"]
        assert 0.49 <= ratio <= 0.51
    for step in (1, 2):  # weights and AdamW moments (= gradients) after each step
        assert_same_tensors(
            ckpt(out, step) / "model.safetensors",
            ckpt(reference, step) / "model.safetensors",
            exact=False,
            rel=1e-5,
            atol=WEIGHT_ATOL,
        )
        assert_same_tensors(
            ckpt(out, step) / "optimizer.safetensors",
            ckpt(reference, step) / "optimizer.safetensors",
            exact=False,
            rel=1e-5,
            atol=MOMENT_ATOL,
        )
    # Step 3 had a NaN loss: skipped, so weights and moments are those of step 2, bit for bit.
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(ckpt(out, 3) / f, ckpt(out, 2) / f, exact=True)
    assert state(out, 3)["adam_step"] == 2 and state(out, 3)["skipped_steps"] == 1
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["train_steps"] == 3
    # The exported drafter (native format, bf16) holds the final trainable weights gathered from the engine.
    from safetensors.torch import load_file

    from deepspec.exporting.io import read_weights

    exported = read_weights(out / "drafter")
    for k, v in load_file(str(ckpt(out, 3) / "model.safetensors")).items():
        assert torch.equal(exported[k], v.to(exported[k].dtype)), k
    # The metrics of a two-process run cover both ranks' tokens and the loss of the global batch.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    ref_loss = {r["step"]: r["loss"] for r in ref_rows if "loss" in r}
    assert loss[1] == pytest.approx(ref_loss[1], rel=1e-5) and loss[2] == pytest.approx(ref_loss[2], rel=1e-5)


def test_two_process_checkpoint_resumes_on_one_process(zero2_run, reference, tiny_cache, tmp_path):
    """World size 2 (ZeRO-2 shards) -> 1: data position, weights, moments and lr carry over; the next step
    matches the single-process run within float tolerance."""
    out = tmp_path / "resumed"
    shutil.copytree(ckpt(zero2_run, 1), ckpt(out, 1))
    train_here(micro_overrides(tiny_cache, out) + SPLIT + ["train.max_steps=2"])
    assert_same_tensors(
        ckpt(out, 2) / "model.safetensors",
        ckpt(reference, 2) / "model.safetensors",
        exact=False,
        rel=1e-5,
        atol=WEIGHT_ATOL,
    )
    assert_same_tensors(
        ckpt(out, 2) / "optimizer.safetensors",
        ckpt(reference, 2) / "optimizer.safetensors",
        exact=False,
        rel=1e-5,
        atol=MOMENT_ATOL,
    )
    assert json.loads((out / "train_summary.json").read_text())["resumed_from_step"] == 1


def test_zero3_resumes_a_zero2_checkpoint_and_matches(zero2_run, reference, tiny_cache, tmp_path):
    """ZeRO-3 shards the drafter (frozen embedding / lm_head included, one tensor padded because its size
    does not divide by the world size). Started from the ZeRO-2 run's step-1 checkpoint, its step 2
    matches the single-process run: full-state checkpoints move between engines."""
    out = tmp_path / "zero3"
    shutil.copytree(ckpt(zero2_run, 1), ckpt(out, 1))
    r = launch(
        micro_overrides(tiny_cache, out) + SPLIT + ["train.max_steps=2", "train.on_nonfinite=stop"],
        launcher="deepspeed_zero3",
    )
    assert r.returncode == 0, tail(r)
    st = state(out, 2)
    assert (st["engine"], st["zero_stage"], st["world_size"], st["adam_step"]) == ("deepspeed", 3, 2, 2)
    assert_same_tensors(
        ckpt(out, 2) / "model.safetensors",
        ckpt(reference, 2) / "model.safetensors",
        exact=False,
        rel=1e-5,
        atol=WEIGHT_ATOL,
    )
    assert_same_tensors(
        ckpt(out, 2) / "optimizer.safetensors",
        ckpt(reference, 2) / "optimizer.safetensors",
        exact=False,
        rel=1e-5,
        atol=MOMENT_ATOL,
    )


def test_bf16_mixed_precision_keeps_fp32_masters(reference, tiny_cache, tmp_path):
    out = tmp_path / "bf16"
    train_here(micro_overrides(tiny_cache, out) + SPLIT + ["train.max_steps=2", "train.mixed_precision=bf16"])
    w = tensors(ckpt(out, 2) / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in w.values())  # master weights stay fp32
    ref = {
        r["step"]: r
        for r in map(json.loads, (reference / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }
    got = {
        r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }
    assert got[2]["loss"] == pytest.approx(ref[2]["loss"], rel=0.02)  # bf16 forward, same training
    assert got[2]["loss"] != ref[2]["loss"]  # ... and it really ran in bf16


def test_fsdp2_state_round_trip_on_cpu(tmp_path):
    """accelerate runs FSDP on GPUs only, so this drives torch's FSDP2 (fully_shard, what accelerate's
    fsdp_version 2 uses) directly on 2 CPU processes: full weights / moments gathered from uneven and
    padded DTensor shards, written back, and the next step redone bit for bit."""
    out = tmp_path / "fsdp.json"
    run_worker("fsdp_worker", out)
    res = json.loads(out.read_text())
    assert res["shapes"] == {"inner.weight": [3, 8], "inner.bias": [3], "out.weight": [1, 3], "out.bias": [1]}
    assert res["adam_step"] == 1 and res["restored"] and res["redone_equal"]


def test_two_nodes_train_checkpoint_resume_equal_one_node(ddp_run, tiny_cache, tmp_path):
    """Two simulated nodes x 1 process train the same 3 steps (step 3 NaN, skipped) as one node x 2
    processes, bit for bit; then a two-node run resumed from step 1 redoes steps 2-3 bit for bit."""
    args = SPLIT + ["train.max_steps=3"]
    faults = {"DEEPSPEC_FAULTS": "nan_loss@3"}
    out = tmp_path / "two-nodes"
    run_two_nodes(TRAIN_PY, micro_overrides(tiny_cache, out) + args, env=faults)
    for step in (1, 2, 3):
        assert state(out, step)["world_size"] == 2 and state(out, step)["engine"] == "ddp"
        for f in ("model.safetensors", "optimizer.safetensors"):
            assert_same_tensors(ckpt(out, step) / f, ckpt(ddp_run, step) / f, exact=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt(out, 1), ckpt(resumed, 1))
    run_two_nodes(TRAIN_PY, micro_overrides(tiny_cache, resumed) + args, env=faults)
    assert json.loads((resumed / "train_summary.json").read_text())["resumed_from_step"] == 1
    for step in (2, 3):
        for f in ("model.safetensors", "optimizer.safetensors"):
            assert_same_tensors(ckpt(resumed, step) / f, ckpt(ddp_run, step) / f, exact=True)
