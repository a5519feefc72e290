"""scripts/draft_vocab_coverage.py: the acceptance ceiling a pruned draft vocabulary puts on a drafter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "draft_vocab_coverage", ROOT / "scripts" / "draft_vocab_coverage.py"
)
cov = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cov)


def test_perfect_tau_counts_the_bonus_token_and_stops_at_the_sequence_end():
    assert cov.perfect_tau(torch.ones(100), 7) == pytest.approx(
        (94 * 8 + sum(range(2, 8))) / 100
    )  # the last 6 positions: τ = 7 … 2
    # every slot passes with probability c: τ = Σ_{k=0..γ} c^k far from the end
    c = 0.8
    long = torch.full((10_000,), c)
    assert cov.perfect_tau(long, 3) == pytest.approx(1 + c + c**2 + c**3, rel=1e-3)
    # a zero at position t stops every round that reaches it
    assert cov.perfect_tau(torch.tensor([1.0, 0.0, 1.0]), 2) == pytest.approx((2 + 1 + 2) / 3)


def test_coverage_on_the_micro_target(micro_target, tmp_path):
    _, _, overrides = micro_target
    out = tmp_path / "cov"
    rep = cov.main(
        ["--sizes", "64,1024", "--gammas", "3", "--sequences", "6", "--out", str(out), "--", *overrides]
    )
    small, full = rep["rows"]
    assert rep["vocab_size"] == 1024 and rep["answer_positions"] > 0
    # the whole vocabulary holds all the mass; a subset holds less, by every measure
    assert full["mean_target_mass_inside"] == pytest.approx(1.0, abs=1e-5)
    assert full["argmax_inside"] == full["labels_inside"] == 1.0
    assert full["perfect_tau_ratio_gamma3"] == pytest.approx(1.0)
    assert 0 < small["mean_target_mass_inside"] < full["mean_target_mass_inside"]
    assert small["perfect_tau_ratio_gamma3"] < full["perfect_tau_ratio_gamma3"]
    saved = json.loads((out / "draft_vocab_coverage.json").read_text())
    assert saved["rows"] == rep["rows"]
    assert "| 64 | 0.062 |" in (out / "draft_vocab_coverage.md").read_text()
