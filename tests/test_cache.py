"""Offline target cache: fp8/bf16 encoding, size model, atomic shards and checksums, manifest checks,
collect kill/resume identity, prefetching reader, and online vs offline training loss."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launchers import run_script, tail

from deepspec.data.cache import (
    CacheError,
    CacheReader,
    bytes_per_token,
    decode_features,
    encode_features,
    finished_shard,
    reference_bytes_per_token,
    write_shard,
)

ROOT = Path(__file__).resolve().parents[1]
COLLECT = [
    "data.max_train_samples=48",
    "data.max_length=128",
    "collect.shard_sequences=2",
    "collect.batch_size=1",
]


def compose(name: str, overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    from deepspec.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hcompose(config_name=name, overrides=list(overrides))


def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ----------------------------------------------------------------------------- encoding and size


def test_fp8_per_token_scale_round_trip():
    g = torch.Generator().manual_seed(0)
    # Three "layers" with very different magnitudes, as real residual streams have.
    x = torch.cat([torch.randn(50, 32, generator=g) * s for s in (0.1, 3.0, 80.0)], dim=1)
    enc = encode_features(x, 3, "fp8")
    assert enc["data"].dtype == torch.float8_e4m3fn and enc["scale"].shape == (50, 3)
    y = decode_features(enc["data"], enc["scale"])
    rel = (y - x).reshape(50, 3, 32).norm(dim=-1) / x.reshape(50, 3, 32).norm(dim=-1)
    assert rel.max() < 0.05  # e4m3 has a 3-bit mantissa: ~2-4% relative error per vector
    enc = encode_features(x, 3, "bf16")
    assert enc["data"].dtype == torch.bfloat16 and "scale" not in enc
    assert torch.allclose(decode_features(enc["data"], None), x, rtol=2**-8, atol=0)
    z = encode_features(torch.zeros(2, 6), 2, "fp8")  # all-zero rows stay zero, no NaN
    assert torch.equal(decode_features(z["data"], z["scale"]), torch.zeros(2, 6))


@pytest.mark.parametrize("hidden,n", [(2560, 5), (4096, 5), (256, 3), (64, 1)])
def test_bytes_per_token(hidden, n):
    ref = reference_bytes_per_token(hidden, n)
    assert ref == 6 + 2 * hidden * (n + 1)
    assert bytes_per_token("bf16", hidden, n) == 5 + 2 * hidden * (n + 1)
    assert bytes_per_token("fp8", hidden, n) == 5 + hidden * (n + 1) + 4 * (n + 1)
    assert bytes_per_token("fp8", hidden, n) <= 0.55 * ref


def test_shard_atomicity_and_checksums(tmp_path):
    t = {"input_ids": torch.arange(10, dtype=torch.int32), "aux": torch.randn(10, 4).to(torch.bfloat16)}
    info = {"shard": 0, "sequences": [0, 2], "key": "k"}
    side = write_shard(tmp_path, 0, t, info)
    assert finished_shard(tmp_path, 0, info) == side
    assert finished_shard(tmp_path, 0, {**info, "key": "other"}) is None  # another collection
    p = tmp_path / "shard-00000.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-7])  # truncated
    assert finished_shard(tmp_path, 0, info) is None
    p.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert finished_shard(tmp_path, 0, info) is None
    (tmp_path / "shard-00000.json").unlink()
    p.write_bytes(data)
    assert finished_shard(tmp_path, 0, info) is None  # no sidecar: never finished
    assert not list(tmp_path.glob(".*tmp*"))


# ----------------------------------------------------------------------------- collection on the micro target


@pytest.fixture(scope="module")
def bf16_cache(micro_target, tmp_path_factory):
    from deepspec.data.collector import collect

    _, _, micro = micro_target
    out = tmp_path_factory.mktemp("cache") / "bf16"
    cfg = compose("collect", micro + COLLECT + [f"collect.cache_dir={out}", "collect.dtype=bf16"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the command-line runs below: same CPU numerics
    try:
        collect(cfg, accelerator(), progress_bar=False)
    finally:
        torch.set_num_threads(n)
    return out


def test_manifest_contents(bf16_cache, micro_target):
    r = CacheReader(bf16_cache)
    m = r.manifest
    assert m["num_sequences"] == len(r.token_data()) == len(m["shards"]) * 2 - (m["num_sequences"] % 2)
    assert m["layer_ids"] == [1] and m["hidden_size"] == 64 and m["storage_dtype"] == "bf16"
    assert m["target"]["config_hash"] and m["target"]["fingerprint"] and "<|im_start|>" in m["chat_template"]
    assert m["num_tokens"] == sum(s["tokens"] for s in m["shards"]) and all(
        len(s["sha256"]) == 64 for s in m["shards"]
    )
    assert m["bytes_per_token"] == 5 + 2 * 64 * 2 and m["reference_bytes_per_token"] == 6 + 2 * 64 * 2
    seq = r.load(3)
    ids, mask = r.token_data()[3]
    assert (
        seq.aux.shape == (len(ids), 64)
        and seq.final.shape == (len(ids), 64)
        and seq.aux.dtype == torch.bfloat16
    )
    assert len(r.heldout_records()) > 0


def _snapshot(d: Path):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_collect_killed_and_resumed_is_identical(bf16_cache, micro_target, tmp_path):
    _, _, micro = micro_target
    out = tmp_path / "killed"
    args = [
        sys.executable,
        str(ROOT / "deepspec" / "collect.py"),
        *micro,
        *COLLECT,
        f"collect.cache_dir={out}",
        "collect.dtype=bf16",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for _attempt in range(3):  # a busy machine may deschedule this poller until the run is over: retry
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not list(out.glob("shard-*.json")):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "manifest.json").exists():
            break
    n_done = len(list(out.glob("shard-*.json")))
    assert not (out / "manifest.json").exists() and 1 <= n_done, "the kill should land mid-collection"
    with pytest.raises(CacheError, match="collection has not finished"):
        CacheReader(out)
    # Plant a half-written temp shard and a finished-looking shard with bad bytes: neither is kept.
    (out / ".shard-00030.safetensors.tmp-1").write_bytes(b"half")
    first = out / "shard-00000.safetensors"
    first.write_bytes(first.read_bytes()[:100])
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _snapshot(out) == _snapshot(bf16_cache)


@pytest.mark.slow
def test_two_process_collect_matches_one(bf16_cache, micro_target, tmp_path):
    """accelerate launch with 2 CPU processes: shards split across ranks, same bytes as one process."""
    _, _, micro = micro_target
    out = tmp_path / "mp"
    args = [*micro, *COLLECT, f"collect.cache_dir={out}", "collect.dtype=bf16"]
    res = run_script(
        ROOT / "deepspec" / "collect.py", args, "ddp", env={"ACCELERATE_USE_CPU": "1"}, timeout=600
    )
    assert res.returncode == 0, tail(res)
    assert _snapshot(out) == _snapshot(bf16_cache)


def test_bad_caches_are_refused(bf16_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bf16_cache, bad)
    p = bad / "shard-00002.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: sha256 does not match"):
        CacheReader(bad)
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=r"shard-00002\.safetensors: shard is \d+ bytes.*truncated"):
        CacheReader(bad, verify=False)
    r = CacheReader(bf16_cache)
    m = r.manifest["target"]
    ok = dict(layer_ids=[1], hidden_size=64, config_hash=m["config_hash"], fingerprint=m["fingerprint"])
    r.check_compatible(**ok)
    with pytest.raises(CacheError, match=r"layer ids \[1\] differ.*\[0, 2\]"):
        r.check_compatible(**{**ok, "layer_ids": [0, 2]})
    with pytest.raises(CacheError, match="hidden size 64 differs.*128"):
        r.check_compatible(**{**ok, "hidden_size": 128})
    with pytest.raises(CacheError, match="config hash"):
        r.check_compatible(**{**ok, "config_hash": "0" * 16}, target_name="other")
    with pytest.raises(CacheError, match="weights differ"):
        r.check_compatible(**{**ok, "fingerprint": "0" * 16}, target_name="other")


def test_collect_refuses_other_collection_in_dir(bf16_cache, micro_target, tmp_path):
    from deepspec.data.collector import collect

    _, _, micro = micro_target
    d = tmp_path / "c"
    shutil.copytree(bf16_cache, d)
    cfg = compose("collect", micro + COLLECT + [f"collect.cache_dir={d}", "collect.dtype=fp8"])
    with pytest.raises(CacheError, match="holds a different collection.*storage_dtype"):
        collect(cfg, accelerator(), progress_bar=False)


# ----------------------------------------------------------------------------- offline training


def _runs(micro, tmp_path, cache_dir, extra=()):
    from deepspec.training.setup import build_run

    common = micro + [
        "data.max_train_samples=48",
        "data.max_length=128",
        "eval.enabled=false",
        "train.global_batch_size=8",
        "train.micro_batch_size=8",
        *extra,
    ]
    on = build_run(compose("train", common + [f"train.output_dir={tmp_path}/on"]), accelerator())
    off = build_run(
        compose(
            "train",
            common + [f"train.output_dir={tmp_path}/off", "data.source=cache", f"data.cache_dir={cache_dir}"],
        ),
        accelerator(),
    )
    return on, off


def test_online_and_offline_bf16_give_the_same_loss(bf16_cache, micro_target, tmp_path):
    from deepspec.training.loop import local_weight_sum, micro_step, rank_micro_batches

    _, _, micro = micro_target
    on, off = _runs(micro, tmp_path, bf16_cache)
    assert [(e.input_ids, e.loss_mask) for e in on.train_examples] == [
        (e.input_ids, e.loss_mask) for e in off.train_examples
    ]
    assert len(off.eval_records) > 0
    for step in (0, 3):
        b_on = rank_micro_batches(on, step, 1, 0)[0]
        b_off = rank_micro_batches(off, step, 1, 0)[0]
        assert torch.equal(b_on.input_ids, b_off.input_ids) and torch.equal(b_on.anchors, b_off.anchors)
        f_on, f_off = on.features(b_on), off.features(b_off)
        valid = b_on.attention_mask.bool()
        for a, b in ((f_on.aux, f_off.aux), (f_on.final, f_off.final)):
            err = (a[valid] - b[valid]).abs()
            assert (err <= a[valid].abs() * 2**-8 + 1e-5).all()  # bf16 rounding, nothing else
        denom = local_weight_sum([b_on], on.drafter_config.block_size, on.cfg.loss.decay_gamma)
        with torch.no_grad():
            l_on = micro_step(on, on.drafter, b_on, denom)
            l_off = micro_step(off, off.drafter, b_off, denom)
        assert float(l_on.loss) == pytest.approx(float(l_off.loss), rel=5e-3)
        for k in ("ce", "l1", "bce", "weight"):
            assert float(l_on.sums[k]) == pytest.approx(float(l_off.sums[k]), rel=5e-3, abs=1e-4)
    assert off.feature_source.hits > 0  # the prefetcher had them ready
    off.feature_source.close()


def test_heldout_score_of_a_cache_run_uses_the_heldout_features(bf16_cache, micro_target, tmp_path):
    """The checkpoint-time τ estimate scores held-out sequences, which are not in the cache: a cache run
    must compute their features with the target (it used to look up training sequences by index)."""
    from deepspec.training.heldout import HeldoutScorer

    _, _, micro = micro_target
    on, off = _runs(micro, tmp_path, bf16_cache)
    on_records = [r["messages"] for r in on.heldout_records[:6]]
    assert on_records and on_records == [r["messages"] for r in off.heldout_records[:6]]
    with torch.no_grad():
        for p_on, p_off in zip(on.drafter.parameters(), off.drafter.parameters()):
            assert torch.equal(p_on, p_off)  # same seed, same initial drafter
    s_on = HeldoutScorer(on, accelerator(), 6)(on.drafter)
    s_off = HeldoutScorer(off, accelerator(), 6)(off.drafter)
    assert s_on["sequences"] == s_off["sequences"] == 6
    assert s_off["loss"] == s_on["loss"] and s_off["tau_est"] == s_on["tau_est"]
    off.feature_source.close()


def test_prefetcher_follows_jumps(bf16_cache):
    from deepspec.data.batching import Example, collate, global_indices
    from deepspec.data.cache_loader import PrefetchingFeatures

    r = CacheReader(bf16_cache)
    ex = [Example(ids, m) for ids, m in r.token_data()]
    n = len(ex)
    direct = PrefetchingFeatures(r, n, seed=0, global_batch=4, depth=0)
    ahead = PrefetchingFeatures(r, n, seed=0, global_batch=4, depth=3)
    for step in (0, 1, 9, 10, 2, 40):  # forward, a jump ahead (resumed run), back, into the next epoch
        keys = global_indices(n, 0, step, 4)
        batch = collate([ex[i] for _, i in keys], keys, 8, 0, 0)
        a, b = direct(batch), ahead(batch)
        assert torch.equal(a.aux, b.aux) and torch.equal(a.final, b.final)
    assert ahead.hits > 0
    ahead.close()


def test_offline_training_refuses_other_layers(bf16_cache, micro_target, tmp_path):
    from deepspec.training.setup import build_run

    _, _, micro = micro_target
    cfg = compose(
        "train",
        micro
        + [
            "model.target_layer_ids=[0,2]",
            "data.source=cache",
            f"data.cache_dir={bf16_cache}",
            f"train.output_dir={tmp_path}/x",
            "eval.enabled=false",
        ],
    )
    with pytest.raises(
        CacheError, match=r"layer ids \[1\] differ from the drafter's target_layer_ids \[0, 2\]"
    ):
        build_run(cfg, accelerator())


def test_damaged_shard_header_without_verification_is_named(bf16_cache, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bf16_cache, bad)
    p = bad / "shard-00001.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"  # same size: only data.verify_cache=true would notice before reading
    p.write_bytes(bytes(data))
    r = CacheReader(bad, verify=False)
    with pytest.raises(
        CacheError, match=r"shard-00001\.safetensors: not a readable cache shard .*verify_cache=true"
    ):
        r.token_data()
