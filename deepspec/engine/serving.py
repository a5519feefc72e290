"""How vLLM must be configured to serve an exported drafter as it was trained.

vLLM (0.32) reads from a speculators export only ``speculators_model_type`` (the method) and
``speculators_config.proposal_methods[0].speculative_tokens`` (γ); everything else it needs comes
from its ``--speculative-config``, which no checkpoint format has a place for:
- ``draft_sample_method``: vLLM drafts greedily by default and then treats draft probabilities as
  one-hot. A DSpark drafter decoded at T>0 must draw its drafts from its own distribution
  ("probabilistic"), or acceptance collapses (docs/engine.md has the measured numbers).
- ``enable_adaptive_verification``: with a confidence head, vLLM sizes each verification from it;
  that path replays CUDA graphs, so it is for GPU serving only.
These settings go into ``deepspec_export.json`` (``serving``) and the model card's serve command.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional


def serving_settings(
    export_config: Dict[str, Any], block_size: int, confidence_head: Optional[bool] = None
) -> Dict:
    """The speculative-config fields vLLM needs for this export (format-independent)."""
    kind = export_config.get("speculators_model_type")
    if kind is None:  # native or z-lab folders: DSpark unless it is the plain backbone
        heads = export_config.get("markov_rank", 0) or export_config.get("enable_confidence_head", False)
        kind = "dspark" if heads else "dflash"
    if confidence_head is None:
        confidence_head = bool(export_config.get("enable_confidence_head", False))
    methods = (export_config.get("speculators_config") or {}).get("proposal_methods") or []
    gamma = int(methods[0].get("speculative_tokens", block_size)) if methods else int(block_size)
    return {
        "speculative_config": {"method": kind, "num_speculative_tokens": gamma},
        "draft_sample_method": {"greedy": "greedy", "sampling": "probabilistic"},
        "enable_adaptive_verification": {
            "available": bool(confidence_head and kind == "dspark"),
            "requires": "CUDA graphs (GPU serving); not runnable on CPU",
        },
    }


def serve_command(
    target: str, drafter: str, settings: Dict, sampling: bool = True, adaptive: bool = False
) -> str:
    """The exact `vllm serve` line; ``sampling``: requests use temperature > 0."""
    spec = {"model": drafter, **settings["speculative_config"]}
    if sampling:
        spec["draft_sample_method"] = settings["draft_sample_method"]["sampling"]
    if adaptive and settings["enable_adaptive_verification"]["available"]:
        spec["enable_adaptive_verification"] = True
    return f"vllm serve {target} --speculative-config '{json.dumps(spec)}'"
