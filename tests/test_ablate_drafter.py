"""scripts/ablate_drafter.py: the zero-Markov copy and the draft-temperature patch (no evaluation run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from export_fixtures import random_features, tiny_drafter, tiny_target

from deepspec.exporting.native import load_native, save_native
from deepspec.models import base, eagle3, parallel

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ablate_drafter", ROOT / "scripts" / "ablate_drafter.py")
ablate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablate)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_zero_markov_copy_zeroes_only_the_output_factor(target, tmp_path):
    src = save_native(tiny_drafter(target, w1_scale=0.1), tmp_path / "src", dtype="float32")
    before = (src / "model.safetensors").read_bytes()
    ablate.copy_drafter(ablate.drafter_folder(src), tmp_path / "out", zero_markov=True)
    assert (src / "model.safetensors").read_bytes() == before  # the original is untouched
    orig, zeroed = load_native(src), load_native(tmp_path / "out")
    assert orig.markov_head.markov_w2.weight.abs().sum() > 0
    assert zeroed.markov_head.markov_w2.weight.abs().sum() == 0
    a, b = orig.state_dict(), zeroed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["markov_head.markov_w2.weight"]
    # The bias was doing something: the same forced block gets other draft distributions without it.
    feats = random_features(orig)
    forced = torch.tensor([5, 6, 7, 8])
    assert not torch.equal(
        orig.draft(feats, 4, 1.0, forced_tokens=forced).probs,
        zeroed.draft(feats, 4, 1.0, forced_tokens=forced).probs,
    )


def test_zero_markov_refuses_a_drafter_without_a_markov_head(target, tmp_path):
    src = save_native(tiny_drafter(target, markov="off"), tmp_path / "src", dtype="float32")
    with pytest.raises(SystemExit, match="no Markov head"):
        ablate.copy_drafter(src, tmp_path / "out", zero_markov=True)


def test_draft_temperature_patch_changes_the_draft_side_only(target, monkeypatch):
    for mod in (parallel, eagle3):
        monkeypatch.setattr(mod, "distribution", mod.distribution)  # restored after the test
    d = tiny_drafter(target)
    feats = random_features(d)
    greedy = d.draft(feats, 4, 0.0)
    ablate.patch_draft_temperature(0.0)
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    torch.testing.assert_close(parallel.distribution(logits, 1.0), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(eagle3.distribution(logits, 1.0), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(base.distribution(logits, 1.0), torch.softmax(logits, -1))  # target side
    # At T = 1 the patched drafter proposes its argmax path, with one-hot q: greedy drafting.
    for seed in range(3):
        sampled = d.draft(feats, 4, 1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled.tokens, greedy.tokens)
        assert torch.equal(sampled.probs.max(-1).values, torch.ones_like(sampled.probs.max(-1).values))
    ablate.patch_draft_temperature(0.5)
    q = d.draft(
        feats, 4, 1.0, generator=torch.Generator().manual_seed(0), forced_tokens=greedy.tokens.flatten()
    ).probs
    ref = d.draft(
        feats, 4, 0.5, generator=torch.Generator().manual_seed(0), forced_tokens=greedy.tokens.flatten()
    ).probs
    torch.testing.assert_close(q, ref)
