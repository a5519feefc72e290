"""``target.shard=fsdp``: the frozen target sharded over 2 CPU processes (gloo) gives the unsharded
target's features bit for bit with half the parameter bytes per rank; launch modes that cannot shard
stop at start-up naming the key. (Training with it against an unsharded run: test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
from launchers import run_worker
from omegaconf import OmegaConf
from train_fixtures import MICRO_TARGET, compose, micro_overrides, train_here

from deepspec.config import ConfigError
from deepspec.target.sharding import check_target_shard, refuse_target_shard


def _cfg(**over):
    base = {"target": {"shard": "fsdp"}, "data": {"source": "tiny_chat"}, "eval": {"enabled": False}}
    for key, value in over.items():
        section, name = key.split("__")
        base[section][name] = value
    return OmegaConf.create(base)


def test_sharding_needs_two_processes():
    with pytest.raises(ConfigError, match=r"target.shard=fsdp needs 2 or more processes.*has 1"):
        check_target_shard(_cfg(), 1)
    check_target_shard(_cfg(), 2)  # online, 2 processes, no end-of-run evaluation: fine
    check_target_shard(_cfg(target__shard="none"), 1)


def test_sharding_refused_where_no_target_runs_per_batch():
    with pytest.raises(ConfigError, match=r"target.shard=fsdp with data.source=cache"):
        check_target_shard(_cfg(data__source="cache"), 2)


def test_sharding_refused_with_end_of_run_evaluation():
    with pytest.raises(ConfigError, match=r"target.shard=fsdp with eval.enabled=true.*eval.enabled=false"):
        check_target_shard(_cfg(eval__enabled=True), 2)


@pytest.mark.parametrize("stage", ["collect (deepspec/collect.py)", "evaluation (deepspec/evaluate.py)"])
def test_other_stages_refuse_a_sharded_target(stage):
    with pytest.raises(ConfigError, match=r"target.shard=fsdp: .* online training"):
        refuse_target_shard(_cfg(), stage)
    refuse_target_shard(_cfg(target__shard="none"), stage)


def test_single_process_training_stops_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"target.shard=fsdp needs 2 or more processes"):
        train_here(micro_overrides(tmp_path / "cache", out) + ["target.shard=fsdp"])
    assert not out.exists()  # preflight: nothing written, no target built


def test_unknown_shard_mode_is_refused_by_the_schema():
    with pytest.raises(Exception, match=r"shard"):
        compose(["target.shard=zero3"])


def tied_split_target(folder):
    """A random Qwen3 with tied embeddings, an odd vocabulary (uneven Shard(0) chunks: 51 + 50 rows) and
    weights split over several safetensors files with an index."""
    from tiny_models import tiny_target

    tiny_target(vocab=101, tie_word_embeddings=True).save_pretrained(str(folder), max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.mark.slow
def test_sharded_target_features_equal_and_half_the_bytes(tiny_cache, tmp_path):
    """Each rank reads only its rows of every weight (deepspec/target/shard_load.py)."""
    import torch

    from deepspec.config import TinyTargetConfig
    from deepspec.target.tiny import build_tiny_target

    torch.set_num_threads(1)
    folder = build_tiny_target(TinyTargetConfig(**MICRO_TARGET, cache_dir=str(tiny_cache)))
    odd = tied_split_target(tmp_path / "tied-split")
    out = tmp_path / "shard.json"
    run_worker("shard_worker", out, f"{folder}:float32", f"{odd}:bfloat16")
    ranks = json.loads(out.read_text())
    assert [x["rank"] for x in ranks] == [0, 1]
    exact = {"aux": 0.0, "final": 0.0, "logits": 0.0, "embed": 0.0, "lm_head": 0.0}
    for x in (r[folder.name] for r in ranks):
        # The same weights, all-gathered: features, logits and the gathered embedding / lm_head are exact.
        assert x["diffs"] == exact
        assert x["aux_shape"] == [2, 24, 3 * MICRO_TARGET["hidden_size"]]
        assert (x["vocab"], x["hidden"]) == (MICRO_TARGET["vocab_size"], MICRO_TARGET["hidden_size"])
        assert 0.49 <= x["shard_bytes"] / x["full_bytes"] <= 0.51
    # Every dim-0 size of the micro target is even: the two shards are the whole model, no padding.
    assert sum(r[folder.name]["shard_bytes"] for r in ranks) == ranks[0][folder.name]["full_bytes"]
    odd_ranks = [r["tied-split"] for r in ranks]
    for x in odd_ranks:  # bf16 from the fp32 files, tied, split files: still exact
        assert x["diffs"] == exact and x["tied"] and x["dtypes"] == ["torch.bfloat16"]
    # 101 embedding rows: rank 0 holds 51, rank 1 holds 50; together exactly the whole model.
    assert odd_ranks[0]["shard_bytes"] > odd_ranks[1]["shard_bytes"]
    assert sum(x["shard_bytes"] for x in odd_ranks) == odd_ranks[0]["full_bytes"]
