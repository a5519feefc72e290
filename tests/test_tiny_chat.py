"""The embedded default's chat data on any text corpus, and the early stop when none can be cut."""

from __future__ import annotations

import random

import pytest

from deepspec.config import TinyTargetConfig
from deepspec.data.tiny_chat import chat_pairs, tiny_chat_splits
from deepspec.target import tiny
from deepspec.target.corpus import TRAIN, load_corpus


def _go_source(rng: random.Random, index: int) -> str:
    out = [f'package pkg{index % 4}\n\nimport "fmt"\n\n']
    for f in range(5):
        out.append(f"// Func{f} combines two values for module {index}.\n")
        out.append(f"func Func{index}_{f}(a int, b int) int {{\n")
        out.append(f"\tif a > {rng.randint(0, 9)} {{\n\t\treturn a + b\n\t}}\n")
        out.append(f"\tfor i := 0; i < {rng.randint(2, 5)}; i++ {{\n\t\ta = a * i\n\t}}\n")
        out.append('\tfmt.Println("done")\n\treturn a\n}\n\n')
    return "".join(out)


@pytest.fixture
def go_corpus(tmp_path):
    rng = random.Random(0)
    for i in range(40):
        (tmp_path / f"m{i:02d}.go").write_text(_go_source(rng, i))
    return tmp_path


def test_any_language_gives_chunk_pairs(go_corpus):
    files = load_corpus(str(go_corpus), "**/*.go", heldout_fraction=0.2)
    pairs = chat_pairs(files, TRAIN)
    assert len(pairs) >= len([f for f in files if f.split == TRAIN])  # at least one per file
    texts = {f.relpath: f.text for f in files}
    for p in pairs:
        user, assistant = (m["content"] for m in p["messages"])
        relpath = p["id"].split("::")[0]
        assert "::chunk" in p["id"]
        assert user and assistant and not user[0].isspace() and not assistant[0].isspace()
        assert assistant == assistant.rstrip() and 32 <= len(assistant) <= 1200
        # The answer continues the prompt in the file: prompt, whitespace, answer, in that order.
        text = texts[relpath]
        start = text.index(user)
        assert text.index(assistant, start + len(user)) - (start + len(user)) <= 4
        assert text[start + len(user) : text.index(assistant, start + len(user))].strip() == ""
        assert len(user) < len(assistant)  # about a third of the chunk goes to the prompt
    assert len({p["id"] for p in pairs}) == len(pairs)


def test_python_keeps_the_function_split_and_broken_python_is_cut_as_text(tmp_path):
    (tmp_path / "ok.py").write_text(
        "def add(a, b):\n    total = a + b\n    total = total * 2 + a - b\n    return total\n"
    )
    broken = "def broken(:\n" + "".join(f"x{i} = compute_value({i}) + other_value({i})\n" for i in range(12))
    (tmp_path / "bad.py").write_text(broken)
    files = load_corpus(str(tmp_path), heldout_fraction=0.0)
    ids = {p["id"]: p for p in chat_pairs(files, TRAIN)}
    assert "ok.py::add" in ids
    assert ids["ok.py::add"]["messages"][0]["content"] == "def add(a, b):"
    assert any(i.startswith("bad.py::chunk") for i in ids)
    assert not any(i.startswith("ok.py::chunk") for i in ids)


def test_long_single_line_is_broken_at_spaces(tmp_path):
    text = " ".join(f"var v{i}=f({i});" for i in range(400))
    (tmp_path / "min.js").write_text(text)
    files = load_corpus(str(tmp_path), "*.js", heldout_fraction=0.0)
    pairs = chat_pairs(files, TRAIN)
    assert len(pairs) >= 2
    for p in pairs:
        user, assistant = (m["content"] for m in p["messages"])
        assert f"{user} {assistant}" in text  # cut between words, nothing lost inside the chunk


def test_nothing_usable_stops_before_the_build(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(f"x{i}\n")  # one short line each: nothing to cut
    cfg = TinyTargetConfig(corpus_dir=str(corpus), corpus_glob="*.txt", cache_dir=str(tmp_path / "cache"))

    def no_build(*a, **k):
        raise AssertionError("the build started")

    monkeypatch.setattr(tiny, "_run_build", no_build)
    monkeypatch.setattr(tiny, "train_tokenizer", no_build)
    with pytest.raises(ValueError) as err:
        tiny.build_tiny_target(cfg, log=lambda _m: None)
    msg = str(err.value)
    for needle in (str(corpus), "'*.txt'", "target.tiny.corpus_dir", "target.tiny.corpus_glob", "max_files"):
        assert needle in msg
    with pytest.raises(ValueError, match="0 train and 0 held-out pairs"):
        tiny_chat_splits(cfg)


def test_build_gets_the_pairs_of_a_non_python_corpus(go_corpus, tmp_path, monkeypatch):
    seen = {}

    def fake_build(cfg, files, pairs, out_dir, bf16, log):
        seen.update({k: len(v) for k, v in pairs.items()})
        raise RuntimeError("stop here")

    monkeypatch.setattr(tiny, "_run_build", fake_build)
    cfg = TinyTargetConfig(
        corpus_dir=str(go_corpus), corpus_glob="*.go", heldout_fraction=0.2, cache_dir=str(tmp_path / "c")
    )
    with pytest.raises(RuntimeError, match="stop here"):
        tiny.build_tiny_target(cfg, log=lambda _m: None)
    assert seen["train"] > 0 and seen["heldout"] > 0
