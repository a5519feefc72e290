"""The one start-up check (deepspec/config/validate.py): typed choices, a range for every number, the
rules across keys, and every entry point running it before anything loads."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import typing
from enum import Enum
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_models import target_config

from deepspec.config import DeepSpecConfig, DrafterConfig, TrainConfig, allowed, validate
from deepspec.config.validate import (
    AUTO_INT_KEYS,
    RANGES,
    ConfigError,
    Range,
    choice_fields,
    range_table,
    schema_fields,
)

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "target.name_or_path=/nonexistent/target"


def compose(name: str = "train", overrides=()):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from deepspec.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


@functools.cache
def _default():
    return compose()


def default_plain():
    return plain(_default())


def plain(cfg):
    """The same tree without the schema: what a dict-built config or a loaded config.yaml gives."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))


# ----------------------------------------------------------------------------- the table covers the schema
def _is_numeric(tp) -> bool:
    if tp in (int, float):
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:  # Optional[float]: None = unset
        return _is_numeric(next(a for a in args if a is not type(None)))
    return typing.get_origin(tp) in (list, typing.List) and args and args[0] in (int, float)


def test_every_numeric_key_of_the_schema_has_a_range():
    numeric = {key for key, tp in schema_fields() if _is_numeric(tp)}
    assert numeric, "the schema walk found no numbers"
    missing = sorted(numeric - set(RANGES))
    assert not missing, f"numeric keys without a range in RANGES: {missing}"
    stale = sorted(set(RANGES) - numeric)
    assert not stale, f"RANGES names keys the schema does not have: {stale}"
    # the two numbers that also take "auto" are typed Any and checked by hand
    any_typed = {key for key, tp in schema_fields() if tp is typing.Any}
    assert any_typed == set(AUTO_INT_KEYS)


def test_choice_fields_are_enums():
    choices = dict(choice_fields())
    expected = {
        "target.dtype",
        "target.shard",
        "target.tiny.family",
        "target.tiny.preset",
        "model.kind",
        "model.markov_head_type",
        "model.attn_impl",
        "loss.impl",
        "data.source",
        "data.on_error",
        "regen.backend",
        "collect.dtype",
        "collect.split",
        "collect.backend",
        "train.mixed_precision",
        "train.strategy",
        "train.on_nonfinite",
        "export.format",
        "export.dtype",
    }
    assert set(choices) == expected
    assert allowed(choices["train.mixed_precision"]) == ("no", "bf16")
    assert allowed(choices["model.kind"]) == ("dspark", "dflash", "eagle3")
    # a composed config holds the Enum members, which still read as the plain strings
    cfg = compose(overrides=["train.mixed_precision=bf16", "model=eagle3"])
    assert isinstance(cfg.train.mixed_precision, Enum) and cfg.train.mixed_precision == "bf16"
    assert f"{cfg.model.kind}" == "eagle3" and str(cfg.data.source) == "tiny_chat"
    assert "mixed_precision: bf16" in OmegaConf.to_yaml(cfg)


def test_docs_table_is_the_range_table():
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert range_table() in text, "docs/configuration.md: regenerate the table with range_table()"


def test_every_shipped_config_passes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from deepspec.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for recipe in ("tiny", "qwen3", "qwen3-4b", "qwen3-14b", "llama3", "gemma"):
            for model in ("dspark", "dflash", "eagle3"):
                validate(hydra_compose(config_name="train", overrides=[f"recipe={recipe}", f"model={model}"]))
        for stage in ("collect", "evaluate", "regenerate", "export"):
            validate(hydra_compose(config_name=stage))


# ----------------------------------------------------------------------------- choices
@pytest.mark.parametrize("key", sorted(dict(choice_fields())))
def test_bad_choice_on_the_command_line_names_key_and_allowed_values(key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose(overrides=[f"{key}=bogus"])
    text = f"{e.value} {e.value.__cause__}"
    assert key in text and "bogus" in text
    for value in allowed(dict(choice_fields())[key]):
        assert value in text


@pytest.mark.parametrize("key", sorted(dict(choice_fields())))
def test_bad_choice_in_validate_names_key_and_allowed_values(key):
    cfg = default_plain()
    OmegaConf.update(cfg, key, "bogus")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    values = ", ".join(allowed(dict(choice_fields())[key]))
    assert str(e.value) == f"{key}='bogus' is unknown; expected one of: {values}"


def test_validate_takes_plain_dataclasses_and_subtrees():
    with pytest.raises(
        ConfigError, match=r"train.mixed_precision='fp16' is unknown; expected one of: no, bf16"
    ):
        validate(TrainConfig(mixed_precision="fp16"), prefix="train")
    with pytest.raises(
        ConfigError, match=r"model.attn_impl='xformers' is unknown; expected one of: auto, sdpa, flex"
    ):
        validate(DrafterConfig(attn_impl="xformers"), prefix="model")
    validate(DeepSpecConfig())  # the defaults, without OmegaConf
    # a subtree is checked against its own rules only (no loss.* keys under model)
    validate(DrafterConfig(), prefix="model")


# ----------------------------------------------------------------------------- ranges
def _outside(rule: Range):
    """A value just outside the range (or None if it has no bound)."""
    if rule.lo is not None:
        return rule.lo if rule.lo_open else rule.lo - 1
    if rule.hi is not None:
        return rule.hi if rule.hi_open else rule.hi + 1
    return None


def _inside(rule: Range):
    if rule.lo is not None and rule.hi is not None:
        return (rule.lo + rule.hi) / 2
    return (rule.lo if not rule.lo_open else rule.lo + 1) if rule.lo is not None else 0


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_is_enforced_with_the_key_named(key):
    rule, cfg = RANGES[key], _default()
    value = OmegaConf.select(cfg, key)
    is_int = isinstance(value[0] if rule.each else value, int)
    bad, good = _outside(rule), _inside(rule)
    if bad is None:  # no bounds: only non-finite numbers are refused
        bad = float("nan")
    elif is_int:
        bad, good = math.floor(bad), math.ceil(good)
    c = plain(cfg)
    OmegaConf.update(c, key, [good, bad] if rule.each else bad)
    with pytest.raises(ConfigError) as e:
        validate(c)
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and f"must be {rule.text()}" in msg, msg
    c = plain(cfg)
    OmegaConf.update(c, key, [good] if rule.each else good)
    _patch_across(c, key, good)
    validate(c)  # a value inside the range passes


def _patch_across(c, key, good):
    """Keep the cross-key rules satisfied when one key moves to an in-range value."""
    if key == "train.micro_batch_size":
        OmegaConf.update(c, "train.global_batch_size", good)
    if key == "train.global_batch_size":
        OmegaConf.update(c, "train.micro_batch_size", 1)
    if key in ("target.tiny.num_heads", "target.tiny.num_kv_heads"):
        OmegaConf.update(c, "target.tiny.num_heads", good)
        OmegaConf.update(c, "target.tiny.num_kv_heads", 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_anchors=0", "data.num_anchors=0: must be >= 1"),
        ("data.num_anchors=-3", "data.num_anchors=-3: must be >= 1"),
        ("train.lr=0", "train.lr=0.0: must be > 0"),
        ("train.lr=-5e-5", "train.lr=-5e-05: must be > 0"),
        ("train.warmup_ratio=1.5", "train.warmup_ratio=1.5: must be in [0, 1]"),
        ("train.epochs=-1", "train.epochs=-1.0: must be > 0"),
        ("loss.l1_weight=-0.9", "loss.l1_weight=-0.9: must be >= 0"),
        ("loss.confidence_weight=-1", "loss.confidence_weight=-1.0: must be >= 0"),
        ("model.block_size=1", "model.block_size=1: must be >= 2"),
        ("train.micro_batch_size=0", "train.micro_batch_size=0: must be >= 1"),
        ("regen.sampling.top_p=1.5", "regen.sampling.top_p=1.5: must be in (0, 1]"),
        ("eval.temperatures=[0.0,-0.5]", "eval.temperatures=[0.0, -0.5]: element -0.5: must be >= 0"),
        ("train.betas=[0.9,1.0]", "train.betas=[0.9, 1.0]: element 1.0: must be in [0, 1)"),
        ("train.lr=nan", "train.lr=nan: must be > 0"),
    ],
)
def test_bad_numbers_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides=[override]))
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["loss.ce_weight=0", "loss.l1_weight=0", "loss.confidence_weight=0"],
            ["loss.ce_weight=0.0", "loss.soft_ce_weight=0.0", "all 0"],
        ),
        (
            ["model=dflash", "loss.ce_weight=0", "loss.confidence_weight=1"],
            ["loss.ce_weight=0.0", "all 0", "trains only a confidence head"],
        ),
        (["model=eagle3", "model.num_layers=2"], ["model.num_layers=2", "exactly one layer"]),
        (
            ["train.global_batch_size=8", "train.micro_batch_size=3"],
            ["train.global_batch_size=8", "multiple"],
        ),
        (["eval.save_sts=true", "eval.sts_fit_temperature=0.5"], ["eval.sts_fit_temperature=0.5"]),
        (["model.target_layer_ids=[1,-4]"], ["model.target_layer_ids=[1, -4]", ">= -1"]),
        (["model.mask_token_id=-2"], ["model.mask_token_id=-2"]),
        (["model.target_layer_ids=last"], ["model.target_layer_ids='last'", "'auto'"]),
        (["eval.datasets=[]"], ["eval.datasets is empty"]),
        (["train.resume="], ["train.resume is empty"]),
        (["target.tiny.num_heads=4", "target.tiny.num_kv_heads=3"], ["target.tiny.num_heads=4"]),
    ],
)
def test_rules_across_keys(overrides, words):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides=overrides))
    for w in words:
        assert w in str(e.value)


# ----------------------------------------------------------------------------- entry points: before anything loads
def test_train_dry_run_validates_too(tmp_path):
    from deepspec.training.loop import train

    with pytest.raises(ConfigError, match="data.num_anchors=0"):
        train(
            compose(overrides=["train.dry_run=true", "data.num_anchors=0", f"train.output_dir={tmp_path}/o"])
        )


def test_collect_evaluate_regenerate_export_validate_first(tmp_path):
    from deepspec.data.collector import collect
    from deepspec.data.regenerate import regenerate
    from deepspec.eval.pipeline import run_evaluation
    from deepspec.exporting.pipeline import run_export

    with pytest.raises(ConfigError, match=r"^collect.batch_size=0: must be >= 1"):
        collect(compose("collect", [NOWHERE, f"collect.cache_dir={tmp_path}/c", "collect.batch_size=0"]))
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match=r"^regen.thinking_sampling.min_p=2.0: must be in \[0, 1\]"):
        regenerate(
            compose(
                "regenerate",
                [
                    NOWHERE,
                    f"regen.input={tmp_path}/none.jsonl",
                    f"regen.output={tmp_path}/r.jsonl",
                    "regen.thinking_sampling.min_p=2",
                ],
            )
        )
    assert not (tmp_path / "r.jsonl").exists()
    with pytest.raises(ConfigError, match=r"^eval.calibration_fraction=1.0: must be in \(0, 1\)"):
        run_evaluation(
            compose("evaluate", [NOWHERE, f"eval.drafter={tmp_path}/none", "eval.calibration_fraction=1"])
        )
    cfg = plain(compose("export", [f"export.checkpoint={tmp_path}/none"]))
    OmegaConf.update(cfg, "export.format", "onnx")
    with pytest.raises(
        ConfigError, match=r"^export.format='onnx' is unknown; expected one of: native, speculators, dflash"
    ):
        run_export(cfg.export)


@pytest.mark.parametrize(
    "script, args, key",
    [
        ("train.py", ["data.num_anchors=0"], "data.num_anchors=0: must be >= 1"),
        ("export.py", ["export.checkpoint=/nonexistent", "train.lr=-1"], "train.lr=-1.0: must be > 0"),
    ],
)
def test_command_line_prints_one_line_naming_the_key(script, args, key, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "deepspec" / script), *args, NOWHERE, f"train.output_dir={tmp_path}/o"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"error: {key}" in r.stderr and "Traceback" not in r.stderr


def test_resolved_spec_holds_plain_strings():
    """Choices reach the drafter spec as plain strings: it is written to JSON, YAML (the model card's
    front matter is yaml.safe_dump, which refuses Enum members) and compared with loaded files."""
    import yaml

    from deepspec.models.config import resolve_drafter_config

    target = target_config("qwen3", vocab_size=64, num_hidden_layers=6).to_dict()
    for model in ("dspark", "dflash", "eagle3"):
        cfg = compose(overrides=[f"model={model}", "model.markov_head_type=gated", "model.attn_impl=sdpa"])
        spec = resolve_drafter_config(cfg.model, target, mask_token_id=63)
        assert (spec.kind, spec.markov_head_type, spec.attn_impl) == (model, "gated", "sdpa")
        assert all(type(v) is str for v in (spec.kind, spec.markov_head_type, spec.attn_impl))
        yaml.safe_dump(spec.to_dict())
