"""Confidence at every temperature (docs/method.md, Confidence head): the two acceptance events the
head is trained on, STS stored per decoding temperature through export and reload, the scheduler
and the drafter reading the output and the fit of the run's temperature, and older single-output
drafters loading onto the sampling output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from export_fixtures import random_features, tiny_drafter, tiny_target

from deepspec.config import LossConfig
from deepspec.data.anchors import block_targets
from deepspec.eval.calibration import survival_estimates
from deepspec.eval.pipeline import save_sts, sts_to_store
from deepspec.eval.scheduler import schedule, verify_len_for
from deepspec.exporting.io import EXTRA_WEIGHTS_NAME, WEIGHTS_NAME, tensor_header
from deepspec.exporting.native import load_native, save_native
from deepspec.exporting.writer import export_drafter, load_export
from deepspec.losses import HeadLogits, dspark_loss
from deepspec.losses.agreement import greedy_acceptance, row_argmax
from deepspec.models.base import HeadFactors


def _bce(z: float, y: float) -> float:
    return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 / (1 + math.exp(z))))


# ----------------------------------------------------------------------------- the two events


def hand_made():
    """One anchor, γ = 3 slots over a 4-token vocabulary, every slot valid (labels don't matter here).

    slot 1: q = p                          -> TV 0,   argmax equal      (both events: survive)
    slot 2: q = [.5 .3 .1 .1], p = [.3 .5 .1 .1] -> TV .2, argmax differ (sampling .8, greedy 0)
    slot 3: q = [.7 .1 .1 .1], p = [.4 .3 .2 .1] -> TV .3, argmax equal (sampling .7, greedy 1)
    """
    q = torch.tensor([[0.25, 0.25, 0.4, 0.1], [0.5, 0.3, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    p = torch.tensor([[0.25, 0.25, 0.4, 0.1], [0.3, 0.5, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    ids = torch.tensor([[0, 1, 2, 3, 0]])
    tg = block_targets(ids, torch.ones_like(ids), torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.long), 3)
    return q.log()[None, None], p.log()[None, None], tg


def test_bce_targets_of_both_events_on_hand_made_distributions():
    zq, zp, tg = hand_made()
    assert tg.valid.all()
    assert greedy_acceptance(zq, zp).tolist() == [[[1.0, 0.0, 1.0]]]
    sampling, greedy = [0.3, -0.2, 1.1], [0.5, 0.4, -0.7]  # confidence logits of the two outputs
    cfg = LossConfig(
        ce_weight=0.0, l1_weight=0.0, confidence_weight=1.0, greedy_confidence_weight=1.0, decay_gamma=0
    )
    out = dspark_loss(
        zq, torch.tensor([[sampling]]), zp, tg, cfg, 1.0, greedy_confidence_logits=torch.tensor([[greedy]])
    )
    c_star = [1.0, 0.8, 0.7]  # 1 - TV(q, p)
    assert out.sums["accept_k"].tolist() == pytest.approx(c_star, abs=1e-6)
    assert out.sums["greedy_accept_k"].tolist() == [1.0, 0.0, 1.0]
    want_s = sum(_bce(z, y) for z, y in zip(sampling, c_star))
    want_g = sum(_bce(z, y) for z, y in zip(greedy, [1.0, 0.0, 1.0]))
    assert float(out.sums["bce"]) == pytest.approx(want_s, rel=1e-5)
    assert float(out.sums["bce_greedy"]) == pytest.approx(want_g, rel=1e-5)
    assert float(out.loss) == pytest.approx(want_s + want_g, rel=1e-5)
    # Its weight scales only its own term; without greedy logits the term is absent.
    half = LossConfig(**{**cfg.__dict__, "greedy_confidence_weight": 0.5})
    out = dspark_loss(
        zq, torch.tensor([[sampling]]), zp, tg, half, 1.0, greedy_confidence_logits=torch.tensor([[greedy]])
    )
    assert float(out.loss) == pytest.approx(want_s + 0.5 * want_g, rel=1e-5)
    assert "bce_greedy" not in dspark_loss(zq, torch.tensor([[sampling]]), zp, tg, cfg, 1.0).sums


def test_greedy_event_on_every_logits_form_and_a_draft_vocabulary():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 3, 4, 8, generator=g), torch.randn(50, 8, generator=g)
    z, w2 = torch.randn(2, 3, 4, 5, generator=g), torch.randn(50, 5, generator=g)
    dense = h @ w.t()
    assert torch.equal(row_argmax(HeadLogits(h, w)), dense.argmax(-1))  # the target's lazy logits
    full = dense + z @ w2.t()
    assert torch.equal(row_argmax(HeadFactors(h, w, z, w2)), full.argmax(-1))  # the chunked drafter head
    assert torch.equal(row_argmax(HeadFactors(h, w)), dense.argmax(-1))
    # A draft vocabulary: draft id i is target id ids[i]; the drafter's argmax is compared in target ids.
    ids = torch.tensor([7, 3, 0, 1])
    draft = torch.full((1, 1, 2, 4), -5.0)
    draft[0, 0, 0, 1] = 5.0  # draft id 1 = target id 3
    draft[0, 0, 1, 0] = 5.0  # draft id 0 = target id 7
    tgt = torch.zeros(1, 1, 2, 10)
    tgt[0, 0, 0, 3] = 1.0  # target argmax 3: agrees
    tgt[0, 0, 1, 1] = 1.0  # target argmax 1: draft id 1 would agree, target id 7 does not
    assert greedy_acceptance(draft, tgt, ids).tolist() == [[[1.0, 0.0]]]


# ----------------------------------------------------------------------------- heads and drafts


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def test_draft_carries_the_output_of_its_temperature(target):
    d = tiny_drafter(target).eval()
    assert d.config.greedy_confidence and d.confidence_head.greedy_proj is not None
    head = d.confidence_head
    with torch.no_grad():  # the greedy output = the sampling output + 3
        head.greedy_proj.weight.copy_(head.proj.weight)
        head.greedy_proj.bias.copy_(head.proj.bias + 3.0)
    feats = random_features(d)
    forced = torch.tensor([5, 6, 7, 8])  # same tokens at both temperatures: same Markov features
    greedy = d.draft(feats, 4, 0.0, forced_tokens=forced)
    sampling = d.draft(feats, 4, 1.0, generator=torch.Generator().manual_seed(0), forced_tokens=forced)
    assert (greedy.confidence_event, sampling.confidence_event) == ("greedy", "sampling")
    torch.testing.assert_close(greedy.confidence_logits - sampling.confidence_logits, torch.full((4,), 3.0))


# ----------------------------------------------------------------------------- STS per temperature

FIT0, FIT1 = [0.5, 0.6, 0.7, 0.8], [1.5, 1.25, 1.0, 2.0]


@pytest.mark.parametrize("fmt", ["native", "speculators"])
def test_sts_per_temperature_round_trip_through_export(target, tmp_path, fmt):
    d = tiny_drafter(target).eval()
    d.config.sts_by_temperature = {"0": FIT0, "1.0": FIT1}
    out = export_drafter(d, tmp_path / fmt, fmt, "float32")  # the checker compares both outputs
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sts_by_temperature"] == {"0.0": FIT0, "1.0": FIT1} and cfg["greedy_confidence"] is True
    # vLLM refuses tensor names it does not know in a top-level *.safetensors: the greedy output
    # lives in the deepspec-only file of a subfolder.
    main, extra = tensor_header(out / WEIGHTS_NAME), tensor_header(out / EXTRA_WEIGHTS_NAME)
    assert not any("greedy_proj" in k for k in main) and "confidence_head.proj.weight" in main
    assert sorted(extra) == ["confidence_head.greedy_proj.bias", "confidence_head.greedy_proj.weight"]
    assert [p.name for p in out.glob("*.safetensors")] == [WEIGHTS_NAME]
    back = load_export(out)
    c = back.config
    assert c.greedy_confidence and c.sts_by_temperature == {"0.0": FIT0, "1.0": FIT1}
    assert c.sts_for(0.0) == FIT0 and c.sts_for(1.0) == FIT1
    assert c.sts_for(0.7) == FIT1  # nearest fit at T > 0: the same (sampling) output
    # The reloaded greedy output is the trained one.
    feats, forced = random_features(d), torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(
        back.draft(feats, 4, 0.0, forced_tokens=forced).confidence_logits,
        d.draft(feats, 4, 0.0, forced_tokens=forced).confidence_logits,
    )
    # include_sts=false drops every fit
    bare = export_drafter(d, tmp_path / f"{fmt}-bare", fmt, "float32", include_sts=False)
    assert "sts_by_temperature" not in json.loads((bare / "config.json").read_text())


def test_native_folder_keeps_the_greedy_output_out_of_model_safetensors(target, tmp_path):
    d = tiny_drafter(target).eval()
    folder = save_native(d, tmp_path / "drafter", dtype="float32")
    assert not any("greedy_proj" in k for k in tensor_header(folder / WEIGHTS_NAME))
    back = load_native(folder)
    torch.testing.assert_close(back.confidence_head.greedy_proj.weight, d.confidence_head.greedy_proj.weight)


def test_evaluator_stores_a_fit_per_temperature(target, tmp_path):
    d = tiny_drafter(target).eval()
    folder = save_native(d, tmp_path / "drafter", dtype="float32")
    report = {
        "temperatures": {
            "0.0": {"temperature": 0.0, "confidence": {"sts_temperatures": FIT0}},
            "1.0": {"temperature": 1.0, "confidence": {"sts_temperatures": FIT1}},
        }
    }
    assert sts_to_store(report, 1.0) == {"1.0": FIT1}
    save_sts(d, folder, sts_to_store(report, 0.0))
    save_sts(d, folder, sts_to_store(report, 1.0))  # merged, the T = 0 fit stays
    back = load_native(folder)
    assert back.config.sts_for(0) == FIT0 and back.config.sts_for(1) == FIT1
    with pytest.raises(ValueError, match="sts_by_temperature"):
        save_sts(d, folder, {"0.0": [1.0, 1.0]})  # not block_size entries


def test_bad_sts_entries_name_the_key(target):
    d = tiny_drafter(target)
    spec = d.config.to_dict()
    for bad, msg in (
        ({"hot": FIT0}, "'hot'"),
        ({"-1": FIT0}, "'-1'"),
        ({"0": [1.0, 0.0, 1.0, 1.0]}, "positive"),
    ):
        with pytest.raises(ValueError, match=msg):
            type(d.config).from_dict({**spec, "sts_by_temperature": bad})


# ----------------------------------------------------------------------------- older drafters


def test_single_output_drafter_loads_onto_the_sampling_output(target, tmp_path):
    """A drafter saved before the greedy output existed (no ``greedy_confidence`` key, no greedy tensors,
    one ``sts_temperatures`` list) loads; its one output is the sampling output at every temperature."""
    d = tiny_drafter(target).eval()
    folder = save_native(d, tmp_path / "old", dtype="float32")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("greedy_confidence")
    cfg["sts_temperatures"] = FIT1
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / EXTRA_WEIGHTS_NAME).unlink()  # the greedy tensors' only home

    old = load_native(folder)
    assert not old.config.greedy_confidence and old.confidence_head.greedy_proj is None
    feats, forced = random_features(d), torch.tensor([1, 2, 3, 4])
    at0 = old.draft(feats, 4, 0.0, forced_tokens=forced)
    assert at0.confidence_event == "sampling"
    torch.testing.assert_close(
        at0.confidence_logits, d.draft(feats, 4, 1.0, forced_tokens=forced).confidence_logits
    )
    assert old.config.sts_for(0.0) == FIT1 == old.config.sts_for(1.0)  # the single fit, at any T
    # and it exports and reloads as such
    back = load_export(export_drafter(old, tmp_path / "spec", "speculators", "float32"))
    assert not back.config.greedy_confidence and back.config.sts_temperatures == FIT1


# ----------------------------------------------------------------------------- the scheduler


def test_scheduler_reads_the_output_and_fit_of_the_run_temperature(target):
    d = tiny_drafter(target).eval()
    d.config.sts_by_temperature = {"0.0": FIT0, "1.0": FIT1}
    with torch.no_grad():
        d.confidence_head.greedy_proj.bias.fill_(2.0)
        d.confidence_head.proj.bias.fill_(-2.0)

    def sps(b):  # a step costs 1 + b/4 time units: verifying is worth it only for likely drafts
        return 1.0 / (1.0 + b / 4.0)

    feats, forced = random_features(d), torch.tensor([1, 2, 3, 4])
    for temp, fit in ((0.0, FIT0), (1.0, FIT1)):
        f = verify_len_for(d.config, temp, sps)
        assert f.sts_temperatures == fit
        gen = torch.Generator().manual_seed(0)
        dr = d.draft(feats, 4, temp, generator=gen, forced_tokens=forced)
        curve = survival_estimates(dr.confidence_logits.double().numpy()[None], fit)[0]
        assert f(0, dr) == schedule([curve.tolist()], sps)[0][0]
        other = d.draft(feats, 4, 1.0 - temp, generator=gen, forced_tokens=forced)
        with pytest.raises(ValueError, match="acceptance"):
            f(0, other)  # confidences of the other event
    # The two outputs give different cuts here: the greedy one is confident, the sampling one is not.
    g0 = d.draft(feats, 4, 0.0, forced_tokens=forced)
    g1 = d.draft(feats, 4, 1.0, generator=torch.Generator().manual_seed(0), forced_tokens=forced)
    assert verify_len_for(d.config, 0.0, sps)(0, g0) > verify_len_for(d.config, 1.0, sps)(0, g1)
    assert np.all(np.isfinite(g0.confidence_logits.numpy()))
