"""Named sizes of the embedded target (``target.tiny.preset``).

``default`` is the schema's own fields: 6 layers x 128, built in minutes, enough to test the pipeline.
``base`` is a deeper, wider target trained longer on the same corpus and vocabulary, so that drafter
comparisons are made against a target whose features carry more than the next token
(docs/benchmarks.md, Results on a stronger target). It builds once in about half an hour on 2 CPU
cores and is then cached like the default.

A preset supplies the fields left at their defaults; a field set to anything else keeps its value
(``target.tiny.preset=base target.tiny.train_steps=20`` is the base model trained 20 steps). The
resolved fields are what the cache key, the build and the build report see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from deepspec.config import TinyTargetConfig
from deepspec.config.choices import TinyPreset, allowed

PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "base": {
        "num_layers": 12,
        "hidden_size": 192,
        "num_heads": 6,
        "num_kv_heads": 2,
        "head_dim": 32,
        "intermediate_size": 576,
        "train_steps": 1000,
        # A deeper stack wants a gentler peak and a longer warmup than the 6-layer default.
        "lr": 2e-3,
        "warmup_steps": 60,
    },
}


def resolve_preset(cfg: TinyTargetConfig) -> TinyTargetConfig:
    """``cfg`` with its preset's values in every field still at the schema default."""
    name = str(cfg.preset)  # a TinyPreset is a StrEnum: str() is its value
    if name not in PRESETS:
        raise ValueError(f"target.tiny.preset={name!r} is unknown; expected one of {allowed(TinyPreset)}")
    defaults = {f.name: f.default for f in dataclasses.fields(TinyTargetConfig)}
    changes = {k: v for k, v in PRESETS[name].items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **changes) if changes else cfg
