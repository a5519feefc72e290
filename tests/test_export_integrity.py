"""Exports publish no local path and never delete a training run; a killed export leaves nothing behind
for long (docs/guarantees.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from export_fixtures import tiny_drafter, tiny_target

from deepspec.config import ExportConfig
from deepspec.exporting.io import ExportInputError
from deepspec.exporting.native import save_native
from deepspec.exporting.pipeline import run_export
from deepspec.exporting.public import LocalVerifierError, public_name


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """A run whose target and data are local folders at absolute paths."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("private-machine")
    target = tiny_target("qwen3")
    tdir = root / "models" / "my-qwen3"
    target.save_pretrained(str(tdir))
    target.config._name_or_path = str(tdir)  # what AutoConfig.from_pretrained(<folder>) records
    run = root / "runs" / "r1"
    save_native(tiny_drafter(target), run / "drafter")
    data = f"{root / 'data' / 'a.jsonl'},{root / 'data' / 'b.jsonl'}"
    (run / "config.yaml").write_text(
        yaml.safe_dump({"target": {"name_or_path": str(tdir)}, "data": {"source": "chat", "path": data}})
    )
    (run / "run_info.json").write_text(json.dumps({"target": str(tdir)}))
    return root, run


def test_public_name():
    assert public_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B" and public_name("tiny") == "tiny"
    assert public_name("/data/models/Qwen3-8B/") == "Qwen3-8B" and public_name("~/m/x") == "x"
    assert public_name("./ckpt") == "ckpt" and public_name("C:\\models\\q") == "q"


@pytest.mark.parametrize("fmt", ["speculators", "native", "dflash"])
def test_exports_carry_no_local_path(local_run, tmp_path, fmt):
    root, run = local_run
    out = tmp_path / "exp"
    drafter = None
    if fmt == "dflash":
        from deepspec.exporting.writer import load_export

        drafter = load_export(run / "drafter")
        drafter.config.markov_rank = 0  # dflash carries no Markov head: export a DFlash-shaped twin
        drafter.markov_head = None
        drafter.config.enable_confidence_head = drafter.config.greedy_confidence = False
        drafter.confidence_head = None
    run_export(
        ExportConfig(checkpoint=str(run), output_dir=str(out), format=fmt), drafter=drafter, run_dir=run
    )
    leaked = [p.name for p in out.rglob("*") if p.is_file() and str(root).encode() in p.read_bytes()]
    assert leaked == []
    cfg = json.loads((out / "config.json").read_text())
    if fmt == "speculators":
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == "my-qwen3"
    readme = (out / "README.md").read_text()
    assert "drafter for `my-qwen3`" in readme and "vllm serve <path or Hub id of my-qwen3>" in readme
    assert "`data.path`: a.jsonl,b.jsonl" in readme


def test_push_with_a_local_verifier_is_refused(local_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    _, run = local_run
    e = ExportConfig(checkpoint=str(run), output_dir=str(tmp_path / "exp"), push_to_hub=True, repo_id="u/r")
    with pytest.raises(LocalVerifierError, match="local model .*my-qwen3.*set export.base_model="):
        run_export(e)
    assert not (tmp_path / "exp").exists()  # refused before anything was written


def test_overwrite_refuses_a_folder_holding_a_training_run(local_run, tmp_path):
    _, run = local_run
    victim = tmp_path / "runs"
    (victim / "old-run" / "checkpoints" / "step-00000002").mkdir(parents=True)
    (victim / "old-run" / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    e = ExportConfig(checkpoint=str(run), output_dir=str(victim), overwrite=True, format="native")
    with pytest.raises(ExportInputError, match="holds a training run .*export.overwrite_training_run=true"):
        run_export(e)
    assert (victim / "old-run" / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()
    e.overwrite_training_run = True
    run_export(e)
    assert (victim / "config.json").is_file() and not (victim / "old-run").exists()


def test_a_killed_exports_staging_folder_is_removed_next_time(local_run, tmp_path, caplog):
    import socket

    _, run = local_run
    out = tmp_path / "exp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".exp.staging-{host}-{dead.pid}-abc123"
    (stale / "partial").mkdir(parents=True)
    legacy = tmp_path / ".exp.staging-k2j3h4"  # an older writer's name: no host or pid
    legacy.mkdir()
    live = tmp_path / f".exp.staging-{host}-{Path('/proc/self').resolve().name}-zzz"  # this process: alive
    live.mkdir()
    with caplog.at_level("WARNING", logger="deepspec"):
        run_export(ExportConfig(checkpoint=str(run), output_dir=str(out), format="native"))
    assert not stale.exists() and not legacy.exists() and live.exists()
    assert "left by an interrupted export" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])


def test_training_with_a_push_and_a_local_verifier_is_refused_at_start(monkeypatch, tmp_path):
    from train_fixtures import compose

    from deepspec.training.loop import preflight

    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    push = ["export.push_to_hub=true", "export.repo_id=u/r", f"train.output_dir={tmp_path / 'run'}"]
    with pytest.raises(LocalVerifierError, match="local model 'tiny'.*export.base_model="):
        preflight(compose(push))
    assert not (tmp_path / "run").exists()
    preflight(compose(push + ["export.base_model=Qwen/Qwen3-0.6B"]))  # a Hub id: accepted
