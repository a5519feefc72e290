"""The main job end to end on a micro tiny target: build -> train -> export -> evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MICRO_TARGET = [
    "target.tiny.max_files=150",
    "target.tiny.train_steps=40",
    "target.tiny.hidden_size=64",
    "target.tiny.head_dim=16",
    "target.tiny.intermediate_size=128",
    "target.tiny.num_layers=4",
    "target.tiny.vocab_size=1024",
    "target.tiny.batch_size=8",
    "target.tiny.seq_len=128",
]


def train(tmp: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(ROOT / "deepspec" / "train.py"),
        *MICRO_TARGET,
        f"target.tiny.cache_dir={tmp / 'cache'}",
        f"train.output_dir={tmp / out}",
        "train.progress_bar=false",
        "train.log_every=2",
        "eval.num_prompts=2",
        "eval.max_new_tokens=16",
        *extra,
    ]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_main_job_end_to_end(tmp_path):
    r = train(tmp_path, "run", "train.max_steps=12")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    # Native drafter, resolved config, metrics, eval and the serving export all land in the run dir.
    native = json.loads((run / "drafter" / "config.json").read_text())
    assert native["architectures"] == ["Qwen3DSparkModel"] and native["block_size"] == 7
    assert (run / "drafter" / "model.safetensors").stat().st_size > 0
    assert "markov_rank: 64" in (run / "config.yaml").read_text()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in rows if "loss" in m]  # training rows (held-out rows are logged separately)
    assert metrics[-1]["step"] == 12
    assert metrics[-1]["loss"] < metrics[0]["loss"], "the drafter did not learn"
    assert all(1.0 <= m["tau_est"] <= 8.0 for m in metrics)
    report = json.loads((run / "eval.json").read_text())
    for temp in ("0.0", "1.0"):
        m = report["temperatures"][temp]
        assert 1.0 <= m["tau"] <= 8.0
        assert len(m["conditional_acceptance"]) == 7
    # Greedy speculative decoding reproduces the target's greedy output exactly.
    assert report["temperatures"]["0.0"]["identical_outputs"] == report["num_prompts"] == 2
    assert (run / "export" / "speculators" / "config.json").is_file()
    # The model card of the serving export carries this run's measured τ.
    card = (run / "export" / "speculators" / "README.md").read_text()
    for temp in ("0.0", "1.0"):
        assert f"| {temp} | {report['temperatures'][temp]['tau']:.3f} |" in card
    # Nothing was written outside the configured places.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"]

    # A second run reuses the cached target instead of rebuilding it.
    r2 = train(tmp_path, "run2", "train.max_steps=2", "eval.enabled=false", "export.after_training=false")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "reusing" in r2.stdout + r2.stderr
    assert len(list((tmp_path / "cache").glob("tiny-target-*"))) == 1


def test_unknown_key_fails_at_start(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "deepspec" / "train.py"), "train.lrr=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "Key 'lrr' not in 'TrainConfig'" in r.stderr
