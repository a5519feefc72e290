"""``deepspec/evaluate.py`` and ``deepspec/export.py`` take a training run's lock (``run.lock``,
deepspec/training/run_dir.py) before they write into it: while another process holds it they stop with
an error naming the holder and write nothing; while they run, a training (or another evaluation /
export) of that run is refused, naming them; they release the lock when done."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from launchers import launch_env
from omegaconf import OmegaConf

from deepspec.training.run_dir import RunLockedError

HOLD = (
    "import sys, time; from deepspec.training.run_dir import RunLock; "
    "RunLock(sys.argv[1], sys.argv[2]).acquire(); print('held', flush=True); time.sleep(300)"
)
TRY = (
    "import sys; from deepspec.training.run_dir import RunLock, RunLockedError\n"
    "try:\n    RunLock(sys.argv[1], 'training').acquire()\nexcept RunLockedError as e:\n    print(e)\n"
    "else:\n    print('acquired')"
)


@contextmanager
def held_elsewhere(run: Path, what: str = "training"):
    """Another live process holding ``run``'s lock, as a running training does."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), what], stdout=subprocess.PIPE, text=True, env=launch_env()
    )
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()


def training_would_start(run: Path) -> str:
    """What a training starting on ``run`` from another process hears (its lock attempt's error)."""
    r = subprocess.run(
        [sys.executable, "-c", TRY, str(run)], capture_output=True, text=True, env=launch_env(), timeout=60
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def lock_state(run: Path) -> dict:
    return {**json.loads((run / "run.lock").read_text()), "training": training_would_start(run)}


def test_evaluation_takes_the_run_lock(tmp_path, monkeypatch):
    from test_evaluate import save_drafter
    from test_spec_decode import make_target
    from tiny_models import word_tokenizer

    import deepspec.eval.runner as runner
    from deepspec.config import DeepSpecConfig
    from deepspec.eval.pipeline import run_evaluation

    target = make_target(vocab=32)
    target.model.save_pretrained(tmp_path / "target")
    word_tokenizer().save_pretrained(tmp_path / "target")
    run = tmp_path / "run"
    save_drafter(target, run / "drafter")
    rng = random.Random(0)
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for _ in range(2):
            f.write(json.dumps({"turns": [" ".join(f"w{rng.randrange(25)}" for _ in range(3))]}) + "\n")
    e = dict(drafter=str(run), datasets=[str(tmp_path / "prompts.jsonl")], num_prompts=0, max_new_tokens=6)
    e.update(temperatures=[0.0], concurrency=[1], profile_repeats=1, profile_context=8, progress_bar=False)
    cfg = OmegaConf.merge(
        OmegaConf.structured(DeepSpecConfig),
        {"target": {"name_or_path": str(tmp_path / "target")}, "eval": e},
    )

    with held_elsewhere(run) as holder:
        with pytest.raises(
            RunLockedError,
            match=rf"{run} is in use by another training \(process {holder.pid} on this host.*Nothing was written",
        ):
            run_evaluation(cfg)
    assert sorted(p.name for p in run.iterdir()) == ["drafter", "run.lock"]  # no eval/, the holder's lock

    seen = []
    real = runner.evaluate_datasets

    def spy(*args, **kwargs):  # mid-evaluation: who holds the lock, and what a training would hear
        seen.append(lock_state(run))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate_datasets", spy)
    run_evaluation(cfg)  # the holder is gone: its stale lock is taken over
    (state,) = seen
    assert state["what"] == "evaluation" and state["pid"] == os.getpid()
    assert f"{run} is in use by another evaluation (process {os.getpid()} on this host" in state["training"]
    assert (run / "eval" / "eval.json").is_file()
    assert not (run / "run.lock").exists()  # released
    assert training_would_start(run) == "acquired"


def test_export_takes_the_run_lock(tmp_path, monkeypatch):
    from export_fixtures import tiny_drafter, tiny_target
    from test_export import _fake_run

    import deepspec.exporting.pipeline as pipeline
    from deepspec.config import ExportConfig

    target = tiny_target("qwen3")
    target.save_pretrained(str(tmp_path / "target"))
    run = _fake_run(tmp_path, tiny_drafter(target), tmp_path / "target")
    e = OmegaConf.structured(ExportConfig(checkpoint=str(run), format="native", dtype="float32"))
    before = sorted(p.name for p in run.iterdir())

    with held_elsewhere(run, "evaluation") as holder:
        with pytest.raises(
            RunLockedError,
            match=rf"{run} is in use by another evaluation \(process {holder.pid} on this host.*Nothing was written",
        ):
            pipeline.run_export(e, echo=lambda s: None)
    assert sorted(p.name for p in run.iterdir()) == sorted(before + ["run.lock"])  # no export/

    seen = []
    real = pipeline.export_drafter

    def spy(*args, **kwargs):
        seen.append(lock_state(run))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "export_drafter", spy)
    res = pipeline.run_export(e, echo=lambda s: None)
    assert res.output_dir == run / "export" / "native" and res.report.ok
    (state,) = seen
    assert state["what"] == "export" and state["pid"] == os.getpid()
    assert f"{run} is in use by another export (process {os.getpid()} on this host" in state["training"]
    assert not (run / "run.lock").exists()
    # The trainer's own export (drafter given) runs inside the training's lock and takes none itself.
    seen.clear()
    with held_elsewhere(run):
        e.overwrite = True
        assert pipeline.run_export(
            e, drafter=tiny_drafter(target), run_dir=run, echo=lambda s: None
        ).report.ok
    assert seen and seen[0]["what"] == "training"


def test_cli_says_one_line(tmp_path):
    """``deepspec/export.py`` on a run in use: exit 1, one line on stderr naming the holder, no traceback."""
    from export_fixtures import tiny_drafter, tiny_target
    from launchers import REPO
    from test_export import _fake_run

    target = tiny_target("qwen3")
    target.save_pretrained(str(tmp_path / "target"))
    run = _fake_run(tmp_path, tiny_drafter(target), tmp_path / "target")
    with held_elsewhere(run) as holder:
        r = subprocess.run(
            [
                sys.executable,
                str(REPO / "deepspec" / "export.py"),
                f"export.checkpoint={run}",
                "export.format=native",
            ],
            capture_output=True,
            text=True,
            env=launch_env(),
            cwd=tmp_path,
            timeout=120,
        )
    assert r.returncode == 1
    assert r.stderr.strip().startswith(f"error: {run} is in use by another training (process {holder.pid}")
    assert "Traceback" not in r.stderr
