"""Where a run writes (only where the config says), what it logs (the training metrics to the console,
metrics.jsonl, TensorBoard, offline W&B, no secrets), and the dry-run plan (no target loaded)."""

from __future__ import annotations

import json

import pytest
from train_fixtures import compose, launch, micro_overrides, tail  # noqa: F401

TRAINING_METRICS = [
    "loss",
    "ce",
    "l1",
    "bce",
    "tau_est",
    "conf_abs_err",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "peak_mem_gb",
] + [f"accept@{k}" for k in range(1, 8)]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_outputs_go_where_the_config_says_with_tensorboard_and_offline_wandb(tiny_cache, tmp_path):
    home, cwd, out = tmp_path / "home", tmp_path / "cwd", tmp_path / "run"
    home.mkdir()
    cwd.mkdir()
    env = {
        "HOME": str(home),
        "WANDB_MODE": "offline",
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "HF_HOME": str(home / ".cache" / "huggingface"),
    }
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = ""  # unset below: the run must choose folders inside its output dir itself
    r = launch(
        micro_overrides(tiny_cache, out)
        + [
            "train.max_steps=2",
            "train.checkpoint.every=1",
            "logging.tensorboard=true",
            "logging.wandb=true",
            "train.progress_bar=true",
        ],
        env={k: v for k, v in env.items() if v},
        cwd=cwd,
    )
    assert r.returncode == 0, tail(r)
    files = _files(out)
    for expected in (
        "config.yaml",
        "metrics.jsonl",
        "run_info.json",
        "train_summary.json",
        "drafter/config.json",
        "drafter/model.safetensors",
        "checkpoints/index.json",
        "checkpoints/step-00000002/trainer_state.json",
        "wandb_run_id.txt",
    ):
        assert expected in files, expected
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert any(f.startswith("wandb/offline-run-") for f in files)
    assert _files(cwd) == []  # nothing relative to the working directory
    assert _files(home) == []  # nor in the home folder
    # Console: progress bar with ETA and a line per step with the training metrics.
    text = r.stdout + r.stderr
    assert "step 1/2 | loss" in text and "eta" in text and "train: 100%" in text
    # metrics.jsonl and TensorBoard carry every training metric.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(TRAINING_METRICS) <= set(rows[0])
    assert any("heldout_tau_est" in row for row in rows)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tensorboard"))
    ev.Reload()
    tags = set(ev.Tags()["scalars"])
    for m in TRAINING_METRICS:
        assert any(t.endswith("/" + m) for t in tags), m
    assert "heldout/tau_est" in tags
    # The offline W&B run has the config (minus secrets) and the metrics.
    run_dir = next((out / "wandb").glob("offline-run-*"))
    assert (run_dir / "files").is_dir() or list(run_dir.glob("*.wandb"))


def test_secrets_never_reach_the_logged_config():
    from deepspec.training.metrics_log import scrub_secrets

    cfg = {
        "regen": {"api_key": "sk-123", "urls": ["http://x"]},
        "export": {"hub_token": "hf_abc", "repo_id": "u/r"},
        "model": {"mask_token_id": 5},
        "wandb": {"password": ""},
    }
    clean = scrub_secrets(cfg)
    assert clean["regen"]["api_key"] == "<redacted>" and clean["export"]["hub_token"] == "<redacted>"
    assert clean["model"]["mask_token_id"] == 5 and clean["export"]["repo_id"] == "u/r"
    assert "sk-123" not in json.dumps(clean) and "hf_abc" not in json.dumps(clean)


def test_dry_run_prints_config_and_plan_without_loading_the_target(tmp_path, monkeypatch, capsys):
    from deepspec.training.loop import train

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = compose(
        [
            "train.dry_run=true",
            "target.name_or_path=/nonexistent/target",
            "train.global_batch_size=16",
            "train.micro_batch_size=2",
            "train.max_steps=1000",
            "train.checkpoint.every=300",
            f"train.output_dir={tmp_path / 'out'}",
        ]
    )
    train(cfg)
    text = capsys.readouterr().out
    assert "name_or_path: /nonexistent/target" in text  # the resolved config
    assert "16 sequences = 4 rank(s) x 2 micro x 2 accumulation" in text
    assert "optimizer steps   : 1,000" in text and "micro-steps/rank  : 2,000" in text
    assert "checkpoints       : 4" in text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe, world", [("qwen3", 64), ("llama3", 8), ("gemma", 16), ("tiny", 1)])
def test_recipes_compose_and_plan(recipe, world, monkeypatch, capsys, tmp_path):
    from deepspec.training.plan import describe_plan

    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = compose([f"recipe={recipe}", f"train.output_dir={tmp_path}", "train.max_steps=100"])
    plan = describe_plan(cfg)
    assert f"world size {world}" in plan and "optimizer steps   : 100" in plan
    if recipe == "qwen3":
        t = cfg.train
        assert (t.lr, t.global_batch_size, t.epochs, t.warmup_ratio, t.mixed_precision) == (
            6e-4,
            512,
            10.0,
            0.04,
            "bf16",
        )
        assert (cfg.data.num_anchors, cfg.model.block_size, cfg.model.markov_rank) == (512, 7, 256)
