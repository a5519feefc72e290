"""The final drafter of a sharded run is the drafter that was trained, of the kind that was trained:
EAGLE-3 (and DSpark) under DeepSpeed ZeRO-2 through the trainer (2 CPU processes, gloo) and under FSDP2
(torch's fully_shard, which accelerate uses on GPUs) through the engine-state helpers. The exported
native folder loads as that kind and reproduces the trained drafter's logits."""

from __future__ import annotations

import json

import pytest
import torch
from launchers import run_worker
from safetensors.torch import load_file
from train_fixtures import ckpt, launch, micro_overrides, state, tail

from deepspec.exporting.native import load_native
from deepspec.exporting.writer import fixed_input, tolerance
from deepspec.models import Eagle3Drafter, build_drafter

pytestmark = pytest.mark.slow

EMBED = ("embed_tokens.weight", "lm_head.weight")


def test_eagle3_under_zero2_exports_the_trained_drafter(tiny_cache, tmp_path):
    out = tmp_path / "eagle3-zero2"
    r = launch(
        micro_overrides(tiny_cache, out)
        + [
            "model=eagle3",
            "train.global_batch_size=8",
            "train.micro_batch_size=2",
            "train.max_steps=2",
            "train.checkpoint.every=2",
        ],
        launcher="deepspeed_zero2",
    )
    assert r.returncode == 0, tail(r)
    st = state(out, 2)
    assert (st["engine"], st["zero_stage"], st["world_size"], st["adam_step"]) == ("deepspeed", 2, 2, 2)

    exported = load_native(out / "drafter")
    assert isinstance(exported, Eagle3Drafter) and exported.config.kind == "eagle3"
    assert "layers.0.hidden_norm.weight" in exported.state_dict()  # EAGLE-3's own layout
    # The export holds the engine's final trainable weights (the step-2 checkpoint, gathered from the
    # ZeRO-2 shards), rounded to the export's bf16.
    trained = load_file(str(ckpt(out, 2) / "model.safetensors"))
    raw = load_file(str(out / "drafter" / "model.safetensors"))
    assert set(raw) == set(trained) | set(EMBED)
    for k, v in trained.items():
        assert torch.equal(raw[k], v.to(raw[k].dtype)), k

    # Logits: the trained fp32 drafter vs the exported one, within bf16 rounding of the weights.
    ref = build_drafter(exported.config)
    ref.load_state_dict({**trained, **{k: raw[k].float() for k in EMBED}})
    with torch.no_grad():
        want = ref.eval()(*fixed_input(ref.config)).logits
        got = exported(*fixed_input(exported.config)).logits
    assert want.shape == got.shape == (1, 2, ref.config.block_size, ref.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=0, atol=tolerance("bfloat16", want.abs().max().item()))
    assert (got - want).abs().max() > 0  # the comparison really went through bf16 weights


def test_fsdp2_final_drafter_is_the_trained_drafter_of_its_kind(tmp_path):
    """2 CPU processes shard a real EAGLE-3 and a DSpark drafter with fully_shard, train two AdamW steps,
    and rebuild the final drafter with ``engine_state.final_drafter`` (what the trainer exports)."""
    res_path = tmp_path / "fsdp.json"
    run_worker("fsdp_drafter_worker", tmp_path)
    res = json.loads(res_path.read_text())
    assert sorted(res) == ["dspark", "eagle3"]
    for kind, got in res.items():
        assert got["final_class"] == ("Eagle3Drafter" if kind == "eagle3" else "ParallelDrafter"), kind
        # Shard units as the trainer's FSDP plugin picks them: the whole drafter, nothing below it.
        assert got["shard_units"] == 0, kind
        assert got["loaded_class"] == got["final_class"] and got["loaded_kind"] == kind
        assert got["weights_moved"], kind  # training changed the sharded weights
        # The gathered drafter == a replica trained unsharded on the same batches, to float noise.
        assert got["final_vs_replica"] < 1e-4 * got["scale"], (kind, got)
        # The exported (bf16) drafter reproduces it within bf16 rounding, and was not trivially equal.
        assert 0 < got["export_vs_final"] <= got["bf16_tolerance"], (kind, got)
