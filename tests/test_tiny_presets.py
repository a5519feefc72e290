"""target.tiny.preset: what each preset resolves to, how it meets explicit fields, and the cache key.

Nothing here builds a target: the key is computed over a two-file stand-in corpus.
"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf
from train_fixtures import compose

from deepspec.config import TinyTargetConfig
from deepspec.target.corpus import HELDOUT, TRAIN, CorpusFile
from deepspec.target.tiny import _as_config, _check, cache_key
from deepspec.target.tiny_presets import PRESETS, resolve_preset

FILES = [CorpusFile("a.py", "x = 1\n", TRAIN), CorpusFile("b.py", "y = 2\n", HELDOUT)]
BASE = {
    "num_layers": 12,
    "hidden_size": 192,
    "num_heads": 6,
    "num_kv_heads": 2,
    "head_dim": 32,
    "intermediate_size": 576,
    "train_steps": 1000,
    "lr": 2e-3,
    "warmup_steps": 60,
}


def test_default_preset_is_the_schema_as_given():
    cfg = TinyTargetConfig(hidden_size=96)
    assert resolve_preset(cfg) == cfg


def test_base_preset_resolves_to_the_intended_target():
    cfg = resolve_preset(TinyTargetConfig(preset="base"))
    assert {k: getattr(cfg, k) for k in BASE} == BASE
    # Same corpus, tokenizer and sequence shape as the default: only size and training length change.
    default = TinyTargetConfig()
    for k in ("vocab_size", "corpus_glob", "max_files", "heldout_fraction", "seq_len", "batch_size", "seed"):
        assert getattr(cfg, k) == getattr(default, k), k
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.num_heads * cfg.head_dim == cfg.hidden_size
    _check(cfg)  # passes the same validation a build runs
    assert resolve_preset(cfg) == cfg  # resolving twice changes nothing


def test_fields_set_explicitly_win_over_the_preset():
    cfg = resolve_preset(TinyTargetConfig(preset="base", train_steps=20, num_layers=4))
    assert (cfg.train_steps, cfg.num_layers, cfg.hidden_size) == (20, 4, 192)


def test_base_preset_changes_the_cache_key_and_default_keys_are_unchanged():
    default = _as_config(TinyTargetConfig())
    base = _as_config(TinyTargetConfig(preset="base"))
    assert cache_key(base, FILES, False) != cache_key(default, FILES, False)
    # The key is made of the resolved fields: the preset name adds nothing, so the same fields
    # spelled out give the same key, and targets built before presets existed keep theirs.
    spelled = TinyTargetConfig(**BASE)
    assert cache_key(base, FILES, False) == cache_key(spelled, FILES, False)
    # Every field a preset sets enters the key (none of them is excluded from it).
    for name, fields in PRESETS.items():
        for k, v in fields.items():
            other = dataclasses.replace(base, **{k: v * 2})
            assert cache_key(other, FILES, False) != cache_key(base, FILES, False), (name, k)


def test_hydra_override_selects_the_preset_and_rejects_unknown_names():
    cfg = compose(["recipe=tiny", "target.tiny.preset=base"])
    assert cfg.target.tiny.preset == "base"
    resolved = _as_config(cfg.target.tiny)  # what build_tiny_target sees
    assert (resolved.num_layers, resolved.hidden_size, resolved.train_steps) == (12, 192, 1000)
    with pytest.raises(Exception, match="preset"):
        compose(["recipe=tiny", "target.tiny.preset=huge"])
    plain = OmegaConf.structured(TinyTargetConfig)
    assert plain.preset == "default"
