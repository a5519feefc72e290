"""collect.backend=vllm: target features from vLLM's extract_hidden_states (docs/engine.md, "Target
features from vLLM").

Fast: the layer-id convention (deepspec id vs vLLM aux id vs HF hidden_states index), the target's
parts loaded without its layers (config hash, fingerprint and final norm equal to the full target's),
config checks, and bad input: a Python without vLLM, a worker that hangs (stopped by process group).
Slow (makes the vLLM environment on first use, like tests/test_engine_vllm.py): a cache collected
through vLLM on a tiny target made here equals the HF-collected one (float32 states within 1e-5,
stored bf16 features within one bf16 rounding step), in our cache format, and vLLM is stopped.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import SPECIAL, WORDS, model_folder, tiny_target

ROOT = Path(__file__).resolve().parents[1]
# vLLM's CPU attention needs a head size in multiples of 32 (docs/engine.md).
VLLM_TARGET = dict(layers=4, hidden_size=64, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
LAYER_IDS = [-1, 0, 2, 3]  # embeddings, a middle layer, the last layer: every case of the convention
FP32_TOL = 1e-5  # vLLM vs HF, float32 states (measured: 3e-8)


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from deepspec.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="collect", overrides=list(overrides))


@pytest.fixture(scope="module")
def word_target(tmp_path_factory):
    """(target folder, chat jsonl) of a tiny Qwen3 on the 32-word tokenizer, and 10 conversations."""
    root = tmp_path_factory.mktemp("vfeat")
    target = model_folder(root / "target", tiny_target(vocab=len(SPECIAL + WORDS), seed=1, **VLLM_TARGET))
    rng = random.Random(0)
    words = [f"w{i}" for i in range(25)]
    with open(root / "chat.jsonl", "w") as f:
        for i in range(10):
            turns = [("user", rng.randint(3, 9)), ("assistant", rng.randint(4, 20))]
            msgs = [{"role": r, "content": " ".join(rng.choices(words, k=n))} for r, n in turns]
            f.write(json.dumps({"id": f"r{i}", "messages": msgs}) + "\n")
    return target, root / "chat.jsonl"


def _overrides(target, chat, out, *extra):
    return [
        f"target.name_or_path={target}",
        "data.source=chat",
        f"data.path={chat}",
        f"model.target_layer_ids=[{','.join(map(str, LAYER_IDS))}]",
        f"collect.cache_dir={out}",
        "collect.shard_sequences=4",
        "collect.batch_size=3",
        *extra,
    ]


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ----------------------------------------------------------------------------- layer ids


def test_layer_id_convention_deepspec_vllm_hf():
    from deepspec.engine.features import aux_layout, hf_hidden_states_index, split_states, vllm_aux_id

    assert [vllm_aux_id(i) for i in (-1, 0, 5)] == [0, 1, 6]
    lay = aux_layout(LAYER_IDS, 4)
    # the last layer's aux id (4) serves both layer 3 and the final norm's input: asked for once
    assert lay.aux_ids == [0, 1, 3, 4] and lay.layer_rows == [0, 1, 2, 3] and lay.final_row == 3
    lay6 = aux_layout([1, 2, 3], 6)  # the default ids of a 6-layer target
    assert lay6.aux_ids == [2, 3, 4, 6] and lay6.layer_rows == [0, 1, 2] and lay6.final_row == 3
    # vLLM returns rows in ascending aux id; each row here holds its aux id
    states = torch.tensor(lay6.aux_ids, dtype=torch.float32)[None, :, None].expand(5, 4, 3)
    aux, last = split_states(states, lay6)
    assert aux.shape == (5, 9) and aux[0].tolist() == [2.0] * 3 + [3.0] * 3 + [4.0] * 3
    assert last.eq(6).all()
    with pytest.raises(ValueError, match="out of range"):
        aux_layout([4], 4)
    with pytest.raises(ValueError, match="final-norm output"):
        hf_hidden_states_index(3, 4)

    # HF's hidden_states[id + 1] is deepspec's layer id for all but the last layer, whose HF entry
    # is the normed final hidden (deepspec's `final`).
    from deepspec.target.adapter import TargetModel

    model = tiny_target(**VLLM_TARGET)
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    ours = TargetModel(model, LAYER_IDS)(ids)
    per = ours.aux.split(64, dim=-1)
    for k, x in zip(LAYER_IDS[:-1], per[:-1]):
        assert torch.equal(x, hs[hf_hidden_states_index(k, 4)]), k
    assert not torch.allclose(per[-1], hs[4]) and torch.allclose(ours.final, hs[4])


@pytest.mark.parametrize("family", ["qwen3", "llama", "gemma4"])
def test_target_parts_equal_the_full_target(family, tmp_path):
    from deepspec.data.cache import target_config_hash, target_fingerprint
    from deepspec.target.adapter import TargetModel
    from deepspec.target.parts import TargetParts

    kw = {} if family == "gemma4" else dict(head_dim=32)
    folder = model_folder(tmp_path / family, tiny_target(family, vocab=len(SPECIAL + WORDS), **kw))
    parts, full = TargetParts(str(folder)), TargetModel.from_pretrained(str(folder), [0, 3])
    assert target_config_hash(parts.config.to_dict()) == target_config_hash(full.config.to_dict())
    assert target_fingerprint(parts.embed_weight, parts.lm_head_weight) == target_fingerprint(
        full.embed_tokens.weight, full.lm_head.weight
    )
    assert (parts.num_layers, parts.hidden_size, parts.vocab_size) == (4, full.hidden_size, full.vocab_size)
    ids = torch.randint(0, 32, (1, 9), generator=torch.Generator().manual_seed(0))
    out = full(ids)
    last = out.aux[..., -full.hidden_size :]  # layer 3 = the last layer's raw output
    assert torch.equal(parts.final_norm(last), out.final)


# ----------------------------------------------------------------------------- config and bad input


def test_tensor_parallel_needs_the_vllm_backend_and_one_process(word_target, tmp_path):
    from deepspec.config import ConfigError, validate
    from deepspec.data.cache import CacheError
    from deepspec.data.collector import collect

    target, chat = word_target
    with pytest.raises(ConfigError, match="collect.tensor_parallel_size=2 needs collect.backend=vllm"):
        validate(_compose(_overrides(target, chat, tmp_path / "c", "collect.tensor_parallel_size=2")))
    with pytest.raises(ConfigError, match="collect.vllm_timeout_s=0"):
        validate(_compose(_overrides(target, chat, tmp_path / "c", "collect.vllm_timeout_s=0")))
    with pytest.raises(Exception, match="collect.backend"):
        _compose(_overrides(target, chat, tmp_path / "c", "collect.backend=sglang"))
    two = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True, device="cpu")
    cfg = _compose(_overrides(target, chat, tmp_path / "c", "collect.backend=vllm"))
    with pytest.raises(CacheError, match="collect.backend=vllm runs in one process"):
        collect(cfg, two, progress_bar=False)


def test_python_without_vllm_says_what_to_install(word_target, tmp_path):
    from deepspec.data.collector import collect
    from deepspec.engine.procs import EngineError

    target, chat = word_target
    out = tmp_path / "c"
    # This test's own Python has no vLLM (deepspec never installs it into its environment).
    cfg = _compose(
        _overrides(target, chat, out, "collect.backend=vllm", f"collect.vllm_python={sys.executable}")
    )
    with pytest.raises(EngineError) as e:
        collect(cfg, _accelerator(), progress_bar=False)
    msg = str(e.value)
    assert "\n" not in msg and "make_vllm_env.sh" in msg and "has no vLLM" in msg
    assert str(out / "vllm-work" / "vllm-features.log") in msg
    assert not (out / "manifest.json").exists()


def test_hung_vllm_is_stopped_by_process_group(word_target, tmp_path):
    from deepspec.data.collector import collect
    from deepspec.engine.procs import EngineError

    target, chat = word_target
    pids = tmp_path / "pids"
    fake = tmp_path / "fake-python"
    # Stands in for a vLLM that never answers: a helper process of its own, and both ignore SIGTERM.
    fake.write_text(f"#!/bin/bash\ntrap '' TERM\n(trap '' TERM; sleep 600) &\necho $$ $! > {pids}\nwait\n")
    fake.chmod(0o755)
    out = tmp_path / "c"
    cfg = _compose(
        _overrides(
            target,
            chat,
            out,
            "collect.backend=vllm",
            f"collect.vllm_python={fake}",
            "collect.vllm_timeout_s=2",
        )
    )
    t = time.monotonic()
    with pytest.raises(
        EngineError, match=r"vLLM wrote no features for part-00000 within 2 s .*vllm_timeout_s.*read "
    ):
        collect(cfg, _accelerator(), progress_bar=False)
    assert time.monotonic() - t < 60
    leader, helper = map(int, pids.read_text().split())
    # SIGKILL to the group after the grace period; the helper (not our child) dies a moment later
    deadline = time.monotonic() + 10
    while (_alive(helper) or _group_alive(leader)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(leader) and not _alive(helper) and not _group_alive(leader)
    assert not (out / "manifest.json").exists()


# ----------------------------------------------------------------------------- through vLLM (slow)


@pytest.mark.slow
def test_vllm_cache_equals_hf_cache(vllm_python, word_target, tmp_path, monkeypatch):
    from deepspec.data.cache import CacheReader, target_config_hash, target_fingerprint
    from deepspec.data.collector import collect
    from deepspec.engine.features import VllmFeatureSource
    from deepspec.target.adapter import TargetModel

    target, chat = word_target
    torch.set_num_threads(1)
    collect(_compose(_overrides(target, chat, tmp_path / "hf")), _accelerator(), progress_bar=False)

    seen, procs = {}, []  # vLLM's float32 states as the collector reads them, and its process
    get, enter = VllmFeatureSource.get, VllmFeatureSource.__enter__

    def keep(self, name):
        seen[name] = get(self, name)
        return seen[name]

    def started(self):
        procs.append(enter(self))
        return procs[-1]

    monkeypatch.setattr(VllmFeatureSource, "get", keep)
    monkeypatch.setattr(VllmFeatureSource, "__enter__", started)
    t = time.monotonic()
    over = _overrides(
        target, chat, tmp_path / "vllm", "collect.backend=vllm", f"collect.vllm_python={vllm_python}"
    )
    collect(_compose(over), _accelerator(), progress_bar=False)
    print(f"collect through vLLM: {time.monotonic() - t:.0f} s")
    deadline = time.monotonic() + 10  # vLLM and every helper it started are stopped
    while _group_alive(procs[0].proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(procs[0].proc.pid) and procs[0].proc.returncode == 0

    hf, vl = CacheReader(tmp_path / "hf"), CacheReader(tmp_path / "vllm")
    assert hf.token_data() == vl.token_data() and len(seen) == 3  # 10 sequences, 4 per shard
    assert vl.manifest["target"] == hf.manifest["target"] and vl.manifest["layer_ids"] == LAYER_IDS
    assert json.loads((tmp_path / "vllm" / "plan.json").read_text())["features_from"] == "vllm"
    full = TargetModel.from_pretrained(str(target), LAYER_IDS)
    vl.check_compatible(
        layer_ids=LAYER_IDS,
        hidden_size=64,
        config_hash=target_config_hash(full.config.to_dict()),
        fingerprint=target_fingerprint(full.embed_tokens.weight, full.lm_head.weight),
    )
    states = [s for k in sorted(seen) for s in seen[k]]
    from deepspec.engine.features import aux_layout, split_states
    from deepspec.target.parts import TargetParts

    lay, parts = aux_layout(LAYER_IDS, 4), TargetParts(str(target))
    worst = {"aux": 0.0, "final": 0.0, "stored": 0.0}
    for i, (ids, _mask) in enumerate(hf.token_data()):
        ref = full(torch.tensor([ids]))
        aux, last = split_states(states[i], lay)
        worst["aux"] = max(worst["aux"], (aux - ref.aux[0]).abs().max().item())
        worst["final"] = max(worst["final"], (parts.final_norm(last) - ref.final[0]).abs().max().item())
        a, b = hf.load(i), vl.load(i)
        for x, y in ((a.aux, b.aux), (a.final, b.final)):
            # bf16 storage: equal, or one rounding step apart where the float32 values (FP32_TOL
            # apart) straddle a rounding boundary
            step = x.float().abs() * 2.0**-7 + FP32_TOL
            assert ((x.float() - y.float()).abs() <= step).all(), i
            worst["stored"] = max(worst["stored"], (x.float() - y.float()).abs().max().item())
    print("max |vLLM - HF|:", worst)
    assert worst["aux"] <= FP32_TOL and worst["final"] <= FP32_TOL
