"""Drafter config resolution: default layer ids, validation errors, the lr schedule, and numbers that
used to pass unchecked (each test below failed before deepspec/config/validate.py)."""

from __future__ import annotations

import dataclasses
import logging
import math
import re

import pytest
from tiny_models import target_config
from train_fixtures import compose

from deepspec.config import DrafterConfig
from deepspec.models.config import DrafterSpec, default_target_layer_ids, resolve_drafter_config
from deepspec.training.optim import lr_factor

V = 64


def qwen3_dict(layers: int = 6) -> dict:
    return target_config("qwen3", vocab_size=V, num_hidden_layers=layers).to_dict()


def resolve(layers: int = 6, mask: int = V - 1, **kw) -> DrafterSpec:
    return resolve_drafter_config(DrafterConfig(**kw), qwen3_dict(layers), mask_token_id=mask)


# ----------------------------------------------------------------------------- 8. default layer ids


def test_default_target_layer_ids_reference_models():
    assert default_target_layer_ids(36) == [1, 9, 17, 25, 33]  # Qwen3-4B / 8B
    assert default_target_layer_ids(40) == [1, 10, 19, 28, 37]  # Qwen3-14B


@pytest.mark.parametrize("layers", range(1, 65))
def test_default_target_layer_ids_small_and_large_targets(layers):
    ids = default_target_layer_ids(layers)
    assert 1 <= len(ids) <= 5
    assert all(0 <= i < layers for i in ids)
    assert all(b > a for a, b in zip(ids, ids[1:]))  # strictly increasing, distinct
    if layers >= 4:
        assert ids[0] == 1 and ids[-1] == layers - 3
    if layers >= 8:
        assert len(ids) == 5
    # The rule's ids always pass the config's own validation.
    c = resolve(layers)
    assert c.target_layer_ids == ids and c.num_target_layers == layers


def test_default_ids_other_counts():
    assert default_target_layer_ids(4) == [1]
    assert default_target_layer_ids(6) == [1, 2, 3]
    assert default_target_layer_ids(36, n=3) == [1, 17, 33]
    assert default_target_layer_ids(36, n=1) == [33]


def test_resolve_fills_target_facts():
    c = resolve(6, block_size=5, markov_rank=12, markov_head_type="gated")
    assert (c.vocab_size, c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == (
        V,
        32,
        8,
        4,
        2,
    )
    assert c.block_size == 5 and c.mask_token_id == V - 1 and c.markov_rank == 12
    assert c.model_type == "qwen3" and c.use_qk_norm and c.rope_theta == 10000.0
    assert c.enable_confidence_head and c.markov_enabled
    # Explicit ids and mask id are taken as given.
    c = resolve_drafter_config(DrafterConfig(target_layer_ids=[-1, 2, 5], mask_token_id=7), qwen3_dict(6))
    assert c.target_layer_ids == [-1, 2, 5] and c.mask_token_id == 7
    # dflash: Markov head and confidence head off.
    c = resolve(6, kind="dflash")
    assert c.markov_rank == 0 and not c.enable_confidence_head and not c.markov_enabled
    # Llama family: no q/k norm.
    llama = target_config("llama", vocab_size=V, num_hidden_layers=5).to_dict()
    c = resolve_drafter_config(DrafterConfig(), llama, mask_token_id=3)
    assert c.model_type == "llama" and not c.use_qk_norm and c.target_layer_ids == [1, 2]
    # to_dict / from_dict round trip.
    assert DrafterSpec.from_dict(c.to_dict()) == c


# ----------------------------------------------------------------------------- 9. errors


@pytest.mark.parametrize("ids", [[1, 6], [0, 17]])
def test_layer_ids_out_of_range(ids):
    with pytest.raises(ValueError, match=r"out of range; the target has 6 layers"):
        resolve(6, target_layer_ids=ids)


def test_layer_ids_below_embeddings_refused_without_a_target():
    with pytest.raises(ValueError, match=re.escape("model.target_layer_ids=[-2, 1]: ids must be >= -1")):
        resolve(6, target_layer_ids=[-2, 1])


@pytest.mark.parametrize("ids", [[3, 2], [1, 1, 4], [4, 2, 5]])
def test_layer_ids_not_increasing(ids):
    with pytest.raises(
        ValueError, match=r"must be strictly increasing and distinct \(the target has 6 layers\)"
    ):
        resolve(6, target_layer_ids=ids)


def test_layer_ids_empty_or_bad_string():
    with pytest.raises(ValueError, match="target_layer_ids is empty"):
        resolve(6, target_layer_ids=[])
    with pytest.raises(ValueError, match="expected 'auto' or a list of ints"):
        resolve(6, target_layer_ids="last")


@pytest.mark.parametrize("bs", [1, 0, -3])
def test_block_size_too_small(bs):
    with pytest.raises(ValueError, match=re.escape(f"model.block_size={bs}: must be >= 2")):
        resolve(6, block_size=bs)


def test_unknown_markov_head_type():
    with pytest.raises(
        ValueError, match=r"model.markov_head_type='lstm' is unknown; expected one of: vanilla, gated, rnn"
    ):
        resolve(6, markov_head_type="lstm")


def test_negative_markov_rank():
    with pytest.raises(ValueError, match="markov_rank=-1: must be >= 0"):
        resolve(6, markov_rank=-1)


@pytest.mark.parametrize("mask", [V, V + 100, -1])
def test_mask_id_outside_embedding(mask):
    with pytest.raises(
        ValueError,
        match=re.escape(f"model.mask_token_id={mask} is outside the target's embedding (vocab_size={V})"),
    ):
        resolve(6, mask=mask)
    with pytest.raises(ValueError, match="outside the target's embedding"):
        resolve_drafter_config(DrafterConfig(mask_token_id=mask), qwen3_dict(6))


def test_mask_auto_without_tokenizer_mask():
    with pytest.raises(ValueError, match="the tokenizer has no mask token"):
        resolve_drafter_config(DrafterConfig(), qwen3_dict(6), mask_token_id=None)


def test_unknown_drafter_kind():
    with pytest.raises(
        ValueError, match=r"model.kind='medusa' is unknown; expected one of: dspark, dflash, eagle3"
    ):
        resolve(6, kind="medusa")


def test_direct_config_validation():
    good = resolve(6)
    with pytest.raises(ValueError, match="has no drafter layer family"):
        dataclasses.replace(good, model_type="gpt2")
    with pytest.raises(ValueError, match="the target has 6 layers"):
        dataclasses.replace(good, target_layer_ids=[1, 6])
    with pytest.raises(ValueError, match="sts_temperatures has 2 entries; expected block_size=7"):
        dataclasses.replace(good, sts_temperatures=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        DrafterSpec.from_dict({**good.to_dict(), "bogus": 1})


def test_spec_uses_the_user_words_and_reads_the_old_key_names():
    from deepspec.config.choices import DrafterKind

    c = resolve(6, kind=DrafterKind.eagle3, num_layers=1)  # the typed config hands over an Enum
    assert type(c.kind) is str  # the spec stays plain: it is written to JSON and YAML (model card)
    d = c.to_dict()
    assert d["kind"] == "eagle3" and d["num_layers"] == 1
    assert "architecture" not in d and "num_hidden_layers" not in d
    old = {k: v for k, v in d.items() if k not in ("kind", "num_layers")}
    assert DrafterSpec.from_dict({**old, "architecture": "eagle3", "num_hidden_layers": 1}) == c
    # DFlash was stored as architecture=dspark with both heads off; it reads back as kind=dflash.
    dflash = resolve(6, kind="dflash")
    old = {k: v for k, v in dflash.to_dict().items() if k not in ("kind", "num_layers")}
    back = DrafterSpec.from_dict({**old, "architecture": "dspark", "num_hidden_layers": 2})
    assert back == dflash and back.kind == "dflash"
    # A dspark with both heads turned off is a DFlash drafter, whichever word built it.
    assert resolve(6, markov_rank=0, enable_confidence_head=False).kind == "dflash"
    with pytest.raises(ValueError, match="model.kind=dflash: this drafter has no Markov or confidence head"):
        dataclasses.replace(dflash, markov_rank=8)


# ----------------------------------------------------------------------------- 10. lr schedule


def test_lr_warmup_then_cosine():
    total, ratio = 100, 0.1  # 10 warm-up steps
    f = [lr_factor(s, total, ratio) for s in range(total + 1)]
    # Linear warm-up, reaching the peak of 1 on its last step.
    for s in range(10):
        assert f[s] == pytest.approx((s + 1) / 10)
    assert max(f) == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    # Cosine from 1 to 0 over the remaining 90 steps.
    for s in range(10, total + 1):
        assert f[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 90)), abs=1e-12)
    assert f[55] == pytest.approx(0.5)
    assert all(b <= a for a, b in zip(f[10:], f[11:]))
    assert f[total] == pytest.approx(0.0, abs=1e-12)
    assert f[total - 1] < 1e-3


def test_lr_min_ratio_and_no_warmup():
    total = 50
    f = [lr_factor(s, total, 0.0, min_lr_ratio=0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(1.0)  # no warm-up: start at the peak
    assert f[25] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[total] == pytest.approx(0.1)
    assert min(f) == pytest.approx(0.1)
    assert lr_factor(10 * total, total, 0.0, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    # Default (docs/method.md, Optimiser defaults): 4% warm-up.
    g = [lr_factor(s, 1000, 0.04) for s in range(1000)]
    assert g[0] == pytest.approx(1 / 40) and g[39] == pytest.approx(1.0) and g[40] == pytest.approx(1.0)
    assert g[999] < 1e-4


# ----------------------------------------------------------------------------- 11. numbers not validated
# Issue: data.num_anchors=0 "finished" a drafter that learned nothing; <0 trained on all-but-N; lr<=0,
# warmup_ratio>1, epochs<0 and negative loss weights were accepted (lr<0 failed inside torch after the
# target had loaded). Each is now refused by train() before the (here nonexistent) target is touched.
@pytest.mark.parametrize(
    "override, key",
    [
        ("data.num_anchors=0", "data.num_anchors"),
        ("data.num_anchors=-2", "data.num_anchors"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio"),
        ("train.epochs=-1", "train.epochs"),
        ("loss.ce_weight=-0.1", "loss.ce_weight"),
        ("loss.l1_weight=-0.9", "loss.l1_weight"),
    ],
)
def test_train_refuses_bad_numbers_before_loading(override, key, tmp_path):
    from deepspec.training.loop import train

    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:
        train(compose([override, "target.name_or_path=/nonexistent/target", f"train.output_dir={out}"]))
    assert str(e.value).startswith(f"{key}=")
    assert not out.exists()


# ----------------------------------------------------------------------------- data.max_length
def _records(n_long: int, n_short: int):
    long_prompt = " ".join(["word"] * 200)
    recs = [
        {
            "id": f"long{i}",
            "messages": [
                {"role": "user", "content": long_prompt},
                {"role": "assistant", "content": "an answer here"},
            ],
        }
        for i in range(n_long)
    ]
    recs += [
        {
            "id": f"short{i}",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "an answer here"},
            ],
        }
        for i in range(n_short)
    ]
    return recs


@pytest.fixture(scope="module")
def tokenizer():
    from chat_fixtures import qwen3_tokenizer

    return qwen3_tokenizer()


def test_over_long_records_are_counted_with_the_key_to_change(tokenizer, caplog):
    from deepspec.training.setup import tokenize_records

    with caplog.at_level(logging.WARNING, logger="deepspec"):
        out = tokenize_records(_records(2, 3), tokenizer, max_length=48)
    assert len(out) == 3 and all(len(e.input_ids) <= 48 for e in out)
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1
    assert re.search(r"dropped 2 of 5 training records: no answer token within data.max_length=48", lines[0])
    assert "raise data.max_length" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepspec"):
        assert len(tokenize_records(_records(2, 3), tokenizer, max_length=4096)) == 5
    assert not [r for r in caplog.records if "dropped" in r.getMessage()]


def test_max_length_too_small_for_any_answer_names_the_key(tokenizer):
    from deepspec.training.setup import train_examples

    cfg = compose(["data.max_length=16"])
    with pytest.raises(ValueError, match=r"data.max_length=16 leaves no answer token in any training record"):
        train_examples(cfg, tokenizer, _records(3, 0))
