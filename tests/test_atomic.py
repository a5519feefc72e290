"""deepspec.atomic: right content, no temporary file left, and a failure mid-write keeps the old file."""

import json
import os
import stat
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from deepspec import atomic


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_bytes_json_jsonl_content(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "héllo\n")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\xff")
    atomic.write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None]}, sort_keys=True)
    atomic.write_jsonl(tmp_path / "d.jsonl", [{"x": "é"}, {"y": 2}])
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "c.json").read_text() == '{\n  "a": [\n    1.5,\n    null\n  ],\n  "b": 1\n}\n'
    assert (tmp_path / "d.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n{"y": 2}\n'
    assert _entries(tmp_path) == ["a.txt", "b.bin", "c.json", "d.jsonl"]  # no temporary file left


def test_new_files_follow_the_umask_not_mkstemp(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == 0o666 & ~atomic._umask()


def test_replaces_existing_file_and_creates_parent(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic.write_json(p, {"v": 1})
    atomic.write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 2}
    assert _entries(p.parent) == ["f.json"]


def test_exception_mid_write_keeps_old_file(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text("old\n")

    def rows():
        yield {"a": 1}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_jsonl(p, rows())
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_open(p) as f:
            f.write("new, half written")
            raise RuntimeError("boom")
    with pytest.raises(TypeError):
        atomic.write_json(p, {"not json": {1, 2}})
    assert p.read_text() == "old\n"
    assert _entries(tmp_path) == ["f.jsonl"]


def test_atomic_open_refuses_append(tmp_path):
    with pytest.raises(ValueError, match="'a'"):
        with atomic.atomic_open(tmp_path / "f", "a"):
            pass


def test_tensors_round_trip_and_failure_keeps_old(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    t = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3).t()}  # non-contiguous on purpose
    atomic.write_tensors(p, t, metadata={"format": "pt"})
    assert torch.equal(load_file(str(p))["w"], t["w"])
    before = p.read_bytes()
    atomic.write_tensors(p, t, metadata={"format": "pt"})
    assert p.read_bytes() == before  # same tensors, same bytes (cache shards are checksummed)

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a header")
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="no space"):
        atomic.write_tensors(p, t)
    assert p.read_bytes() == before
    assert _entries(tmp_path) == ["w.safetensors"]


def test_staged_dir_commits_whole_folder(tmp_path):
    final = tmp_path / "out"
    with atomic.staged_dir(final) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".out.staging-")
        (stage / "sub").mkdir()
        (stage / "sub" / "a").write_text("1")
        assert not final.exists()  # nothing visible until the block ends
    assert (final / "sub" / "a").read_text() == "1"
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o777 & ~atomic._umask()
    assert _entries(tmp_path) == ["out"]


def test_staged_dir_replaces_or_keeps_existing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with atomic.staged_dir(final) as stage:
        (stage / "new").write_text("new")
    assert _entries(final) == ["new"]
    assert _entries(tmp_path) == ["out"]  # the old folder, moved aside, is gone too

    with pytest.raises(FileExistsError):
        with atomic.staged_dir(final, replace=False) as stage:
            (stage / "other").write_text("x")
    assert _entries(final) == ["new"]
    assert _entries(tmp_path) == ["out"]


def test_staged_dir_exception_keeps_old_folder(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(final) as stage:
            (stage / "new").write_text("half")
            raise RuntimeError("killed")
    assert _entries(final) == ["old"]
    assert _entries(tmp_path) == ["out"]


def test_remove_dir_and_remove_stale(tmp_path):
    d = tmp_path / "step-1"
    (d / "x").mkdir(parents=True)
    atomic.remove_dir(d)
    assert _entries(tmp_path) == []
    (tmp_path / ".a.json.tmp-x1").write_text("half")
    (tmp_path / ".out.staging-abc").mkdir()
    (tmp_path / ".out.old-abc").mkdir()
    (tmp_path / "keep.json").write_text("{}")
    (tmp_path / ".hidden").write_text("not ours")
    gone = atomic.remove_stale(tmp_path)
    assert sorted(p.name for p in gone) == [".a.json.tmp-x1", ".out.old-abc", ".out.staging-abc"]
    assert _entries(tmp_path) == [".hidden", "keep.json"]
