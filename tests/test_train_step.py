"""The pieces of training/loop.py on their own, with stand-ins: one optimizer step (train_step), the
metrics of a step's sums (summarise = the logged form of the loss mix), and the end of a run
(finish_run). The NaN/inf policy through train_step is tested in test_train_errors.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from step_standins import OneProcess, micro, step_parts, theta

from deepspec.config import LossConfig
from deepspec.losses import mix, summarise
from deepspec.training.loop import finish_run, train_step


def test_a_step_is_the_global_weighted_mean_however_the_batch_is_split():
    # Σ w·x / Σ w = (1·1 + 1·2 + 2·3) / 4 = 2.25 is the gradient of θ; SGD lr 0.1 moves θ from 1 to 0.775.
    for split in ([([1, 2], [1, 1]), ([3], [2])], [([1, 2, 3], [1, 1, 2])]):
        parts = step_parts(lr=0.1, accum=len(split))
        r = train_step(parts, 0, [micro(*g) for g in split])
        assert theta(parts) == pytest.approx(0.775, abs=1e-6)
        assert float(r.grad_norm) == pytest.approx(2.25, abs=1e-6)
        assert not r.skipped and r.tokens == 3 and r.lr == pytest.approx(0.1)
        assert float(r.sums["weight"]) == 4 and float(r.sums["ce"]) == pytest.approx(9.0)
        assert parts.scheduler.last_epoch == 1 and parts.model.weight.grad is None


def test_a_step_clips_the_gradient_and_reports_the_norm_before_clipping():
    parts = step_parts(lr=0.1, grad_clip=1.0)
    r = train_step(parts, 0, [micro([1, 2, 3], [1, 1, 2])])
    assert float(r.grad_norm) == pytest.approx(2.25, abs=1e-6)
    assert theta(parts) == pytest.approx(0.9, abs=1e-6)  # the clipped gradient is 1


def test_the_lr_reported_is_the_one_the_step_used():
    parts = step_parts(lr=0.1)  # schedule: lr / (step + 1)
    lrs = [train_step(parts, s, [micro([1.0], [1.0])]).lr for s in range(3)]
    assert lrs == pytest.approx([0.1, 0.05, 0.1 / 3])
    assert theta(parts) == pytest.approx(1 - 0.1 - 0.05 - 0.1 / 3, abs=1e-6)


def test_the_logged_loss_is_the_mix_the_step_backpropagates():
    cfg = LossConfig(ce_weight=0.1, l1_weight=0.9, confidence_weight=1.0, soft_ce_weight=0.5)
    terms = {
        "ce": torch.tensor(2.0),
        "l1": torch.tensor(1.0),
        "bce": torch.tensor(0.5),
        "soft_ce": torch.tensor(3.0),
    }
    assert float(mix(terms, cfg)) == pytest.approx(0.2 + 0.9 + 0.5 + 1.5)
    sums = dict(terms, weight=torch.tensor(4.0), tau=torch.tensor(6.0), full_blocks=torch.tensor(2.0))
    sums.update(accept_k=torch.tensor([3.0, 1.0]), valid_k=torch.tensor([4.0, 2.0]))
    m = summarise(sums, cfg)
    assert m["loss"] == pytest.approx(3.1 / 4) and m["ce"] == pytest.approx(0.5)
    assert m["tau_est"] == pytest.approx(3.0)
    assert (m["accept@1"], m["accept@2"]) == pytest.approx((0.75, 0.5))
    # Terms whose weight is 0 are left out: a NaN soft CE of a drafter that does not train it is harmless.
    ce_only = LossConfig(ce_weight=1.0, l1_weight=0.0, confidence_weight=0.0, soft_ce_weight=0.0)
    assert (
        float(mix(dict(terms, soft_ce=torch.tensor(float("nan")), bce=torch.tensor(float("nan"))), ce_only))
        == 2.0
    )


def test_finish_run_saves_the_final_drafter_evaluates_and_writes_the_summary(
    tmp_path, monkeypatch, qwen3_drafter
):
    from deepspec.exporting.native import load_native

    drafter = qwen3_drafter
    cfg = SimpleNamespace(eval=SimpleNamespace(enabled=True), export=SimpleNamespace(after_training=False))
    calls = []

    def fake_eval(run, model, out_dir):
        calls.append((model is drafter, out_dir))
        return {"tau": 3.5}

    monkeypatch.setattr("deepspec.training.setup.run_eval", fake_eval)
    run = SimpleNamespace(out_dir=tmp_path)
    out = finish_run(cfg, OneProcess(), run, drafter, {"train_steps": 2, "final_metrics": {"loss": 1.5}})
    assert out == tmp_path and calls == [(True, tmp_path)]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary == {"train_steps": 2, "final_metrics": {"loss": 1.5}, "eval": {"tau": 3.5}}
    loaded = load_native(tmp_path / "drafter").state_dict()
    for name, w in drafter.state_dict().items():
        torch.testing.assert_close(loaded[name], w.to(torch.bfloat16).float(), rtol=0, atol=0)
