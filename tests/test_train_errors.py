"""Bad input stops early with a message naming what to fix: unknown / mistyped keys, a global batch the
launch cannot split, a checkpoint of another drafter, a NaN/inf loss (stop or skip), bad launch
settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from train_fixtures import (
    assert_same_tensors,
    ckpt,
    compose,
    launch,
    micro_overrides,
    state,
    tail,  # noqa: F401
    train_here,
)


# ----------------------------------------------------------------------------- config keys and types
def test_unknown_override_key_is_named_on_the_command_line(tmp_path):
    r = launch(["train.lrr=1", f"train.output_dir={tmp_path / 'out'}"])
    assert r.returncode != 0
    assert "lrr" in r.stderr and "Traceback" not in r.stderr.split("Could not override")[0][-200:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.checkpoint.evry=2", "train.checkpoint.evry"),
        ("train.checkpoint.every=abc", "train.checkpoint.every"),
        ("logging.wandb=maybe", "logging.wandb"),
        ("train.max_skipped_steps=1.5", "train.max_skipped_steps"),
    ],
)
def test_wrong_key_or_type_names_the_key(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    assert key in f"{e.value} {e.value.__cause__}"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.on_nonfinite=ignore", ["train.on_nonfinite", "ignore", "stop", "skip"]),
        ("train.mixed_precision=fp16", ["train.mixed_precision", "fp16", "no", "bf16"]),
        ("train.strategy=horovod", ["train.strategy", "horovod", "deepspeed", "fsdp"]),
    ],
)
def test_bad_choices_stop_while_composing(override, words):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose([override])
    for w in words:
        assert w in f"{e.value} {e.value.__cause__}"


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.checkpoint.keep_last=0", ["train.checkpoint.keep_last=0", ">= 1"]),
        ("train.log_every=0", ["train.log_every=0", ">= 1"]),
        ("train.strategy=fsdp", ["fsdp", "CUDA"]),
    ],
)
def test_bad_values_fail_before_anything_loads(override, words, tmp_path):
    from deepspec.training.loop import train

    cfg = compose(
        [override, f"train.output_dir={tmp_path / 'out'}", "target.name_or_path=/nonexistent/target"]
    )
    with pytest.raises(ValueError) as e:
        train(cfg)
    for w in words:
        assert w in str(e.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- batch split
def test_global_batch_not_divisible_by_world_times_micro(tmp_path, monkeypatch):
    from deepspec.training.loop import plan_batches, train

    cfg = compose(
        [
            "train.global_batch_size=8",
            "train.micro_batch_size=3",
            f"train.output_dir={tmp_path}/o",
            "target.name_or_path=/nonexistent/target",
        ]
    )
    with pytest.raises(
        ValueError, match=r"train.global_batch_size=8 is not a multiple of train.micro_batch_size=3"
    ):
        train(cfg)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun / accelerate launch would set it
    cfg = compose(
        [
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            f"train.output_dir={tmp_path}/o",
            "target.name_or_path=/nonexistent/target",
        ]
    )
    with pytest.raises(ValueError, match=r"world_size \(3\) × train.micro_batch_size \(2\) = 6"):
        train(cfg)
    assert plan_batches(cfg, 2) == 2 and plan_batches(cfg, 4) == 1


def test_deepspeed_json_must_agree_with_the_training_config(tmp_path):
    from deepspec.training.distributed import deepspeed_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}))
    cfg = compose([f"train.deepspeed_config={p}", "train.global_batch_size=8", "train.micro_batch_size=2"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=3 disagrees"):
        deepspeed_config(cfg, world_size=2, accum=2)
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ds = deepspeed_config(cfg, world_size=2, accum=2)
    assert (
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
        ds["train_batch_size"],
    ) == (2, 2, 8)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is False


# ----------------------------------------------------------------------------- resume mismatches
@pytest.fixture(scope="module")
def one_step(tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-step")
    train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=1"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, shown",
    [
        ("model.markov_rank=8", "markov_rank: checkpoint 16 vs this run 8"),
        ("model.num_layers=1", "num_layers: checkpoint 2 vs this run 1"),
        ("model=dflash", "markov_rank: checkpoint 16 vs this run 0"),
    ],
)
def test_resume_refuses_a_different_drafter_config(override, shown, one_step, tiny_cache, tmp_path):
    out = tmp_path / "other"
    with pytest.raises(ValueError) as e:
        train_here(
            micro_overrides(tiny_cache, out) + ["train.max_steps=2", f"train.resume={one_step}", override]
        )
    assert shown in str(e.value) and str(ckpt(one_step, 1)) in str(e.value)


@pytest.mark.slow
def test_resume_refuses_other_data_order_truncated_files_and_mixing_runs(one_step, tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=8, train.seed=0; this run has 16, 0"):
        train_here(
            micro_overrides(tiny_cache, tmp_path / "a")
            + [f"train.resume={one_step}", "train.max_steps=2", "train.global_batch_size=16"]
        )
    out = tmp_path / "b"
    shutil.copytree(ckpt(one_step, 1), ckpt(out, 1))
    f = ckpt(out, 1) / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="optimizer.safetensors is missing or truncated"):
        train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=2"])
    with pytest.raises(ValueError, match="already holds checkpoints up to step-00000001 from an earlier run"):
        train_here(micro_overrides(tiny_cache, one_step) + ["train.resume=none", "train.max_steps=2"])
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        train_here(micro_overrides(tiny_cache, tmp_path / "c") + [f"train.resume={tmp_path / 'nothing'}"])


@pytest.mark.slow
def test_resume_reads_a_checkpoint_written_before_the_drafter_key_rename(one_step, tiny_cache, tmp_path):
    """drafter_config.json of older checkpoints says architecture/num_hidden_layers for kind/num_layers."""
    out = tmp_path / "legacy"
    shutil.copytree(ckpt(one_step, 1), ckpt(out, 1))
    f = ckpt(out, 1) / "drafter_config.json"
    saved = json.loads(f.read_text())
    saved["architecture"], saved["num_hidden_layers"] = "dspark", saved.pop("num_layers")
    del saved["kind"]

    def write_old(spec: dict) -> None:
        f.write_text(json.dumps(spec))
        # A checkpoint of that time: trainer_state.json recorded sizes only, no hashes, no self-hash.
        trainer = ckpt(out, 1) / "trainer_state.json"
        st = json.loads(trainer.read_text())
        st.pop("state_sha256", None)
        st["files"] = {k: (v["size"] if isinstance(v, dict) else v) for k, v in st["files"].items()}
        st["files"]["drafter_config.json"] = f.stat().st_size
        trainer.write_text(json.dumps(st))

    write_old(saved)
    train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=2"])
    assert state(out, 2)["adam_step"] == 2
    saved["num_hidden_layers"] = 1  # an old key with a different value is still a different drafter
    write_old(saved)
    with pytest.raises(ValueError, match="num_layers: checkpoint 1 vs this run 2"):
        train_here(micro_overrides(tiny_cache, tmp_path / "other") + [f"train.resume={ckpt(out, 1)}"])


# ----------------------------------------------------------------------------- NaN / inf loss
# train_step with stand-ins (tests/step_standins.py): the policy itself, in milliseconds.
def test_nonfinite_stop_raises_before_any_update_naming_step_micro_batch_and_checkpoint():
    from step_standins import micro, step_parts, theta

    from deepspec.training.loop import train_step
    from deepspec.training.nonfinite import NonFiniteLossError

    parts = step_parts(
        optimizer="adamw", policy="stop", last_good="/runs/x/checkpoints/step-00000002", accum=2
    )
    with pytest.raises(NonFiniteLossError) as e:
        train_step(parts, 2, [micro([1.0], [1.0]), micro([2.0], [1.0], nan=True)])
    assert "non-finite loss at step 3 (micro-batch 1, this rank)" in str(e.value)
    assert "last good checkpoint: /runs/x/checkpoints/step-00000002" in str(e.value)
    assert theta(parts) == 1.0 and not parts.optimizer.state and parts.scheduler.last_epoch == 0


def test_nonfinite_skip_drops_the_update_keeps_the_schedule_and_stops_past_the_limit():
    from step_standins import micro, step_parts, theta

    from deepspec.training.loop import train_step
    from deepspec.training.nonfinite import NonFiniteLossError

    parts = step_parts(optimizer="adamw", policy="skip", max_skips=1, accum=2)
    good = [micro([1.0], [1.0]), micro([2.0], [1.0])]
    assert not train_step(parts, 0, good).skipped
    after_first = theta(parts)
    adam_state = {k: v.clone() for k, v in parts.optimizer.state[parts.model.weight].items()}
    r = train_step(parts, 1, [micro([1.0], [1.0], nan=True), micro([2.0], [1.0])])
    assert r.skipped and r.grad_norm is None and parts.guard.skipped == 1
    assert theta(parts) == after_first and parts.model.weight.grad is None
    for k, v in parts.optimizer.state[parts.model.weight].items():
        assert torch.equal(v, adam_state[k]), k  # AdamW moments and step count untouched
    assert parts.scheduler.last_epoch == 2  # the schedule moved on with the data
    assert not train_step(parts, 2, good).skipped and theta(parts) != after_first
    with pytest.raises(
        NonFiniteLossError,
        match=r"2 steps with a non-finite loss \(train.max_skipped_steps=1\); last at step 4",
    ):
        train_step(parts, 3, [micro([1.0], [1.0]), micro([2.0], [1.0], nan=True)])


def test_fault_injected_nan_goes_through_the_same_policy(monkeypatch):
    from step_standins import micro, step_parts

    from deepspec.training.loop import train_step

    monkeypatch.setenv("DEEPSPEC_FAULTS", "nan_loss@2")  # the loss of step 2 (1-based) becomes NaN
    parts = step_parts(policy="skip")
    assert [train_step(parts, s, [micro([1.0], [1.0])]).skipped for s in range(3)] == [False, True, False]


# The same policy end to end: fault injection in a real run (stop: resume; skip: checkpoints).
@pytest.mark.slow
def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(tiny_cache, tmp_path, monkeypatch):
    from deepspec.training.nonfinite import NonFiniteLossError

    monkeypatch.setenv("DEEPSPEC_FAULTS", "nan_loss@3")
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=4", "train.checkpoint.every=2"])
    msg = str(e.value)
    assert "non-finite loss at step 3" in msg and f"last good checkpoint: {ckpt(out, 2)}" in msg
    assert ckpt(out, 2).exists() and not ckpt(out, 4).exists()
    # The run resumes from there once the cause is gone.
    monkeypatch.delenv("DEEPSPEC_FAULTS")
    train_here(micro_overrides(tiny_cache, out) + ["train.max_steps=4", "train.checkpoint.every=2"])
    assert state(out, 4)["adam_step"] == 4


@pytest.mark.slow
def test_nonfinite_loss_skip_drops_only_that_update(tiny_cache, tmp_path, monkeypatch):
    from deepspec.training.nonfinite import NonFiniteLossError

    monkeypatch.setenv("DEEPSPEC_FAULTS", "nan_loss@2")
    out = tmp_path / "run"
    base = micro_overrides(tiny_cache, out) + [
        "train.max_steps=3",
        "train.checkpoint.every=1",
        "train.checkpoint.keep_last=3",
        "train.on_nonfinite=skip",
    ]
    train_here(base)
    for f in ("model.safetensors", "optimizer.safetensors"):
        assert_same_tensors(ckpt(out, 2) / f, ckpt(out, 1) / f, exact=True)
    with pytest.raises(AssertionError):
        assert_same_tensors(
            ckpt(out, 3) / "model.safetensors", ckpt(out, 2) / "model.safetensors", exact=True
        )
    assert [state(out, s)["adam_step"] for s in (1, 2, 3)] == [1, 1, 2]
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == 1
    with pytest.raises(NonFiniteLossError, match="train.max_skipped_steps=0"):
        train_here(
            micro_overrides(tiny_cache, tmp_path / "strict")
            + ["train.max_steps=3", "train.on_nonfinite=skip", "train.max_skipped_steps=0"]
        )
