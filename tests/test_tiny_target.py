"""The embedded target: corpus split, chat pairs cut from it, and a micro build end to end."""

from __future__ import annotations

import math
import random
import shutil
import time

import pytest
import torch

from deepspec.config import TinyTargetConfig
from deepspec.data.tiny_chat import chat_pairs, tiny_chat_splits
from deepspec.target.corpus import HELDOUT, TRAIN, hash_fraction, list_corpus_paths, load_corpus, split_of
from deepspec.target.tiny import COMPLETE_MARKER, MASK, _scrub, build_tiny_target, load_report


def _module_source(rng: random.Random, index: int) -> str:
    """A small, varied, valid Python module (a fixed seed makes the corpus identical every run)."""
    names = ["value", "items", "count", "total", "name", "data", "result", "offset", "size", "key"]
    out = [f'"""Module {index}."""\n', "import math\n\n"]
    for f in range(6):
        a, b = rng.sample(names, 2)
        op = rng.choice(["+", "-", "*", "//"])
        out.append(f"def func_{index}_{f}({a}, {b}=1):\n")
        if rng.random() < 0.5:
            out.append(f'    """Combine {a} and {b} with {op}."""\n')
        out.append(f"    {b} = {b} or 1\n")
        out.append(f"    if {a} > {rng.randint(0, 9)}:\n        return {a} {op} {b}\n")
        out.append(f"    for i in range({rng.randint(2, 5)}):\n        {a} = {a} {op} i\n")
        out.append(f"    return math.floor({a})\n\n")
    out.append(f"class Thing{index}:\n    def __init__(self, {names[index % 10]}):\n")
    out.append(f"        self.{names[index % 10]} = {names[index % 10]}\n        self.ready = True\n")
    return "".join(out)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(36):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i:02d}.py").write_text(_module_source(rng, i))
    (root / "pkg0" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "pkg1" / "empty.py").write_text("")  # nothing to learn: skipped
    (root / "notes.txt").write_text("not python")
    return root


def test_split_is_stable_and_location_independent(corpus_dir, tmp_path):
    files = load_corpus(str(corpus_dir), heldout_fraction=0.25)
    copy = tmp_path / "elsewhere"
    shutil.copytree(corpus_dir, copy)
    (copy / "pkg2" / "extra.py").write_text("y = 1\n")
    moved = {f.relpath: f.split for f in load_corpus(str(copy), heldout_fraction=0.25)}
    assert all(moved[f.relpath] == f.split for f in files)
    assert {f.split for f in files} == {TRAIN, HELDOUT}
    assert [f.relpath for f in files] == sorted(f.relpath for f in files)
    assert "pkg0/latin1.py" not in moved and "pkg1/empty.py" not in moved
    assert "notes.txt" not in moved


def test_split_fraction_and_determinism():
    names = [f"pkg/mod_{i}.py" for i in range(20000)]
    share = sum(split_of(n, 0.05) == HELDOUT for n in names) / len(names)
    assert 0.04 < share < 0.06
    assert [split_of(n, 0.05) for n in names[:100]] == [split_of(n, 0.05) for n in names[:100]]
    assert split_of("a.py", 0.0) == TRAIN
    assert 0.0 <= hash_fraction("x") < 1.0


def test_max_files_is_a_deterministic_sample(corpus_dir):
    a = load_corpus(str(corpus_dir), max_files=10)
    b = load_corpus(str(corpus_dir), max_files=10)
    assert [f.relpath for f in a] == [f.relpath for f in b]
    assert len(a) == 10 and len({f.relpath.split("/")[0] for f in a}) > 1  # spread, not one package


def test_missing_and_empty_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.*\*\*/\*\.py"):
        list_corpus_paths(str(tmp_path / "nope"), "**/*.py")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}.*\*\*/\*\.py"):
        load_corpus(str(tmp_path))
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="no readable UTF-8"):
        load_corpus(str(tmp_path))


def test_chat_pairs(corpus_dir):
    files = load_corpus(str(corpus_dir), heldout_fraction=0.25)
    pairs = chat_pairs(files, TRAIN)
    assert pairs == chat_pairs(files, TRAIN)
    assert len({p["id"] for p in pairs}) == len(pairs)
    heldout = {f.relpath for f in files if f.split == HELDOUT}
    assert all(p["id"].split("::")[0] not in heldout for p in pairs)
    with_doc = 0
    for p in pairs:
        user, assistant = p["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"].startswith("def ") and user["content"].splitlines()[0].endswith(":")
        assert "def " not in assistant["content"].splitlines()[0]
        assert assistant["content"] == assistant["content"].strip()
        if '"""' in user["content"]:
            with_doc += 1
            assert '"""' not in assistant["content"]
    assert with_doc > 0
    ids = {p["id"] for p in pairs}
    assert any("::func_" in i for i in ids)
    # `self.x = x; self.ready = True` is long enough; a two-token body would not be.
    assert any(".__init__" in i and "::Thing" in i for i in ids)
    assert chat_pairs(files, TRAIN, min_body_chars=10_000) == []
    with pytest.raises(ValueError):
        chat_pairs(files, "test")


def test_scrub_keeps_mask_out_of_training_text():
    assert MASK not in _scrub(f"a = '{MASK}'") and "<|im_end|>" not in _scrub("x<|im_end|>")


def _micro_cfg(corpus_dir, cache_dir) -> TinyTargetConfig:
    # One thread: a model this small gains nothing from more, and OpenMP sync stalls on a busy box.
    return TinyTargetConfig(
        corpus_dir=str(corpus_dir),
        heldout_fraction=0.25,
        vocab_size=384,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=32,
        intermediate_size=128,
        seq_len=64,
        batch_size=8,
        train_steps=20,
        lr=3e-3,
        warmup_steps=4,
        eval_batches=2,
        cache_dir=str(cache_dir),
        num_threads=1,
    )


@pytest.fixture(scope="module")
def micro_builds(corpus_dir, tmp_path_factory):
    t0 = time.time()
    a = build_tiny_target(_micro_cfg(corpus_dir, tmp_path_factory.mktemp("cache_a")), log=lambda s: None)
    b = build_tiny_target(_micro_cfg(corpus_dir, tmp_path_factory.mktemp("cache_b")), log=lambda s: None)
    return a, b, time.time() - t0


def test_micro_build_is_deterministic_and_learns(micro_builds):
    from safetensors.torch import load_file

    a, b, seconds = micro_builds
    assert seconds < 60
    assert a.name == b.name and a != b
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    report = load_report(a)
    assert report["heldout_text_loss"] < math.log(384) and report["heldout_chat_loss"] < math.log(384)
    assert list(report["special_token_ids"].values()) == [0, 1, 2, 3]  # endoftext, mask, im_start, im_end
    assert not list(a.parent.glob(".tiny-target-*"))  # no temporary build left behind


def test_micro_build_is_cached(micro_builds, corpus_dir):
    a, _, _ = micro_builds
    logs = []
    t0 = time.time()
    again = build_tiny_target(_micro_cfg(corpus_dir, a.parent), log=logs.append)
    assert again == a and time.time() - t0 < 5 and "reusing" in logs[0]
    assert (a / COMPLETE_MARKER).is_file()


def test_micro_build_loads_as_hf_model(micro_builds):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepspec.data.chat import prompt_ids

    _, b, _ = micro_builds
    tok = AutoTokenizer.from_pretrained(b)
    model = AutoModelForCausalLM.from_pretrained(b)
    assert type(model).__name__ == "Qwen3ForCausalLM" and not model.config.tie_word_embeddings
    assert model.config.max_position_embeddings >= 2048
    assert (tok.mask_token, tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) == (MASK, 1, 3, 0)
    assert sorted(model.generation_config.eos_token_id) == [0, 3]
    prompt = prompt_ids(tok, [{"role": "user", "content": "def f(x):"}])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(prompt)


def test_tiny_chat_splits_helper(corpus_dir):
    cfg = TinyTargetConfig(corpus_dir=str(corpus_dir), heldout_fraction=0.25)
    splits = tiny_chat_splits(cfg)
    assert splits["train"] and splits["heldout"]
    assert not {p["id"] for p in splits["train"]} & {p["id"] for p in splits["heldout"]}


def test_second_builder_waits_then_reuses_the_first_ones_target(micro_builds, corpus_dir, tmp_path):
    # Two runs starting at once on a fresh machine (bench --jobs 2) must not both train the target.
    import shutil
    import threading

    from deepspec import atomic

    a, _, _ = micro_builds
    cache = tmp_path / "cache"
    logs = []
    with atomic.build_lock(cache / f".build-lock-{a.name}"):  # "the first builder", still at work
        t = threading.Thread(
            target=lambda: logs.append(build_tiny_target(_micro_cfg(corpus_dir, cache), logs.append))
        )
        t.start()
        deadline = time.time() + 30
        while not any("waiting for" in str(m) for m in logs) and time.time() < deadline:
            time.sleep(0.05)
        assert any("waiting for" in str(m) for m in logs) and t.is_alive()
        shutil.copytree(a, cache / a.name)  # the first builder finishes
    t.join(30)
    assert logs[-1] == cache / a.name
    assert not any("building" in str(m) for m in logs) and any("reusing" in str(m) for m in logs)


def test_build_lock_is_released_when_its_holder_dies(tmp_path):
    import subprocess
    import sys

    from deepspec import atomic

    lock = tmp_path / "l"
    code = f"import os, fcntl; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    waited = []
    with atomic.build_lock(lock, lambda: waited.append(1)):
        pass
    assert waited == []


def test_base_preset_builds_the_preset_model_and_loads_as_hf(corpus_dir, tmp_path):
    """preset=base with the micro corpus: the size comes from the preset, the fields set here win."""
    from transformers import AutoModelForCausalLM

    cfg = TinyTargetConfig(
        preset="base",
        corpus_dir=str(corpus_dir),
        heldout_fraction=0.25,
        vocab_size=384,
        seq_len=64,
        batch_size=2,
        train_steps=2,
        eval_batches=1,
        cache_dir=str(tmp_path),
        num_threads=1,
    )
    folder = build_tiny_target(cfg, log=lambda s: None)
    model = AutoModelForCausalLM.from_pretrained(folder)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (
        12,
        192,
        6,
        2,
    )
    assert (c.intermediate_size, c.vocab_size) == (576, 384)
    saved = load_report(folder)["config"]
    assert (saved["preset"], saved["num_layers"], saved["train_steps"], saved["lr"]) == ("base", 12, 2, 2e-3)
