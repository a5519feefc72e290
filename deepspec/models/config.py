"""The one in-memory description of a drafter.

Layer ids, mask id and block size are resolved here once from the user's ``model:`` section
(:class:`deepspec.config.DrafterConfig`) and the target's HF config; the model, the trainer, the
evaluator and every export format read them from a :class:`DrafterSpec` and nowhere else. Its
drafter fields use the user's words (``kind``, ``num_layers``, ...); each export format maps them to
its own keys in one function (deepspec/exporting/formats.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from deepspec.config import AttnImpl, DrafterKind, MarkovHeadType, allowed
from deepspec.config import validate as validate_user_config
from deepspec.models.families import FAMILIES, family_for_target, family_named, text_config
from deepspec.models.rope import check_rope

MARKOV_HEAD_TYPES = allowed(MarkovHeadType)
# "dspark": the parallel block drafter with its Markov and/or confidence head; "dflash": the same
# drafter with both heads off; "eagle3": the EAGLE-3 baseline, one autoregressive layer
# (deepspec/models/eagle3.py). deepspec.models.build_drafter maps each kind to its class.
KINDS = allowed(DrafterKind)
# Keys that drafter_config.json files written before the rename used, and their names now.
LEGACY_KEYS = {"architecture": "kind", "num_hidden_layers": "num_layers"}
ATTN_IMPLS = allowed(AttnImpl)


@dataclass
class DrafterSpec:
    # Architecture of the drafter layers (copied from the target's family, deepspec/models/families.py).
    model_type: (
        str  # the drafter layers' family type: qwen3 (also for a Qwen3-MoE target), llama, gemma4_text
    )
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    use_qk_norm: bool
    # Drafter-specific facts.
    num_layers: int
    num_target_layers: int
    target_hidden_size: int
    target_layer_ids: List[int]
    block_size: int
    mask_token_id: int
    num_anchors: int = 512
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # A second confidence output trained on greedy acceptance, read at T = 0 (docs/method.md,
    # Confidence head). False for drafters saved before it existed: they have the sampling output only.
    greedy_confidence: bool = False
    # Draft vocabulary (docs/training.md, "Draft vocabulary"): 0 = the target's whole vocabulary; else
    # the drafter's output layer and the Markov head's output factor have this many rows, mapped to
    # target ids by the drafter's ``d2t``/``t2d`` buffers.
    draft_vocab_size: int = 0
    kind: str = "dspark"  # one of KINDS; a dspark with both heads off is stored as dflash
    # Attention kernel: sdpa (explicit boolean mask), flex (CUDA flex attention), auto = flex on CUDA
    # when importable, else sdpa. A runtime choice: it never changes the numbers beyond rounding.
    attn_impl: str = "auto"
    # Per-slot temperatures from sequential temperature scaling, one list per decoding temperature it
    # was fitted at (keys: the temperature as text, "0.0", "1.0"); None until calibrated.
    sts_by_temperature: Optional[Dict[str, List[float]]] = None
    # One list of unknown decoding temperature, as drafters saved before per-temperature fits stored it;
    # used at every temperature that has no fit of its own (see :meth:`sts_for`).
    sts_temperatures: Optional[List[float]] = None
    # More of the target's layer facts (docs/families.md); the defaults are Qwen3's / Llama's.
    hidden_act: str = "silu"
    rope_parameters: Dict[str, Any] = field(default_factory=dict)  # empty: plain RoPE at rope_theta
    max_position_embeddings: int = 32768
    attention_k_eq_v: bool = False  # Gemma 4: values are the key projection (no v_proj)
    attn_scale: Optional[float] = None  # score scale; None = 1/sqrt(head_dim) (Gemma 4: 1)
    embed_scale: float = 1.0  # Gemma 4 multiplies embeddings by sqrt(hidden_size)
    final_logit_softcapping: Optional[float] = None  # Gemma 4: cap·tanh(logits/cap)
    # The target's own HF config, kept so exports can start from it.
    target_config: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = str(self.kind)  # a DrafterKind from the typed config: keep the spec plain JSON/YAML
        # The kind names what the drafter is: the parallel drafter without either head is DFlash,
        # whichever word built it, so exports read back to an equal spec.
        if self.kind == "dspark" and not self.markov_rank and not self.enable_confidence_head:
            self.kind = "dflash"
        validate(self)

    def confidence_event(self, temperature: float) -> str:
        """Which acceptance event the confidence logits predict when decoding at ``temperature``:
        "greedy" (the draft is the target's argmax) at T = 0 when the drafter has that output, else
        "sampling" (the chance the sampling rule accepts). A drafter without the greedy output
        answers "sampling" at T = 0 too: its single output is the sampling one."""
        return "greedy" if float(temperature) == 0.0 and self.greedy_confidence else "sampling"

    def sts_for(self, temperature: float) -> Optional[List[float]]:
        """The STS temperatures to use when decoding at ``temperature``: the fit stored for exactly that
        decoding temperature; else, for T > 0, the fit at the nearest stored T > 0 (the same sampling
        output, a neighbouring temperature); else the legacy single list; else None (raw logits)."""
        t = float(temperature)
        fits = {float(k): v for k, v in (self.sts_by_temperature or {}).items()}
        if t in fits:
            return list(fits[t])
        warm = sorted((abs(k - t), k) for k in fits if k > 0)
        if t > 0 and warm:
            return list(fits[warm[0][1]])
        return list(self.sts_temperatures) if self.sts_temperatures is not None else None

    @property
    def out_vocab_size(self) -> int:
        """Rows of the drafter's output layer: the draft vocabulary, or the target's whole vocabulary."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def pruned(self) -> bool:
        return 0 < self.draft_vocab_size < self.vocab_size

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    @property
    def markov_enabled(self) -> bool:
        return self.markov_rank > 0

    @property
    def rope(self) -> Dict[str, Any]:
        """The flat RoPE description the drafter's rotary table is built from (deepspec/models/rope.py)."""
        return dict(self.rope_parameters) or {"rope_type": "default", "rope_theta": self.rope_theta}

    @property
    def family(self):
        return family_named(self.model_type)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> DrafterSpec:
        d = upgrade_spec_dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"drafter spec: unknown keys {unknown}")
        return cls(**d)


def upgrade_spec_dict(d: Dict[str, Any]) -> Dict[str, Any]:
    """A spec dict with the key names of :data:`LEGACY_KEYS` renamed (drafter_config.json files of
    checkpoints written before the rename), else ``d`` unchanged."""
    out = {LEGACY_KEYS.get(k, k): v for k, v in d.items()}
    if out.get("kind") == "dspark" and not out.get("markov_rank") and not out.get("enable_confidence_head"):
        out["kind"] = "dflash"
    return out


def default_target_layer_ids(num_layers: int, n: int = 5) -> List[int]:
    """docs/method.md, Context features and layer ids: ``n`` ids evenly spaced from 1 to num_layers-3, fewer on small targets.

    Qwen3 36 layers -> [1, 9, 17, 25, 33]; 40 layers -> [1, 10, 19, 28, 37].
    """
    if num_layers < 1:
        raise ValueError(f"target has {num_layers} layers; need at least 1")
    lo = min(1, num_layers - 1)
    hi = max(lo, num_layers - 3)
    n = max(1, min(n, hi - lo + 1))
    if n == 1:
        return [hi]
    step = (hi - lo) / (n - 1)
    return sorted({int(round(lo + i * step)) for i in range(n)})


def check_layer_ids(ids: List[int], num_layers: int) -> None:
    if not ids:
        raise ValueError("model.target_layer_ids is empty; give at least one layer id or 'auto'")
    for i in ids:
        if not isinstance(i, int) or i < -1 or i >= num_layers:
            raise ValueError(
                f"model.target_layer_ids={ids}: id {i!r} is out of range; the target has "
                f"{num_layers} layers, so ids must be in [-1, {num_layers - 1}] (-1 = embeddings)"
            )
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise ValueError(
            f"model.target_layer_ids={ids} must be strictly increasing and distinct "
            f"(the target has {num_layers} layers)"
        )


def validate(c: DrafterSpec) -> None:
    # The target is known here: ids and the mask row are checked against it first (the messages name
    # its size), then the spec passes the same checks as the user's model.* keys (kind, attn_impl,
    # markov_head_type, block_size, num_layers, markov_rank, the EAGLE-3 layer count).
    if not 0 <= c.mask_token_id < c.vocab_size:
        raise ValueError(
            f"model.mask_token_id={c.mask_token_id} is outside the target's embedding "
            f"(vocab_size={c.vocab_size}); expected an id in [0, {c.vocab_size - 1}]"
        )
    check_layer_ids(list(c.target_layer_ids), c.num_target_layers)
    if not 0 <= c.draft_vocab_size <= c.vocab_size:
        raise ValueError(
            f"model.draft_vocab_size={c.draft_vocab_size} is larger than the target's vocabulary "
            f"(vocab_size={c.vocab_size}); expected 0 (the whole vocabulary) or a size in [1, {c.vocab_size}]"
        )
    if c.draft_vocab_size and c.kind == "eagle3":
        raise ValueError(
            "model.draft_vocab_size: the EAGLE-3 baseline drafts over the whole vocabulary here; "
            "set model.draft_vocab_size=0 or use model.kind=dspark|dflash"
        )
    validate_user_config(c, prefix="model")
    if c.kind in ("dflash", "eagle3") and (c.markov_rank or c.enable_confidence_head):
        raise ValueError(
            f"model.kind={c.kind}: this drafter has no Markov or confidence head (markov_rank=0, "
            "enable_confidence_head=false)"
        )
    family = family_named(c.model_type)  # raises, naming the supported target model_types
    if c.kind == "eagle3" and not family.eagle3:
        raise ValueError(
            f"model.kind=eagle3: the EAGLE-3 baseline has no {family.name} layers; it supports target "
            f"model_types {tuple(t for f in FAMILIES.values() if f.eagle3 for t in f.target_model_types)}"
        )
    check_rope(c.rope, "rope_parameters")
    if c.sts_temperatures is not None and len(c.sts_temperatures) != c.block_size:
        raise ValueError(
            f"sts_temperatures has {len(c.sts_temperatures)} entries; expected block_size={c.block_size}"
        )
    if c.greedy_confidence and not c.enable_confidence_head:
        raise ValueError("greedy_confidence=true needs the confidence head (enable_confidence_head=true)")
    if c.sts_by_temperature is not None:
        c.sts_by_temperature = normalise_sts(c.sts_by_temperature, c.block_size)


def sts_key(temperature: float) -> str:
    """The key of a decoding temperature in ``sts_by_temperature`` ("0.0", "1.0", "0.7")."""
    return repr(float(temperature))


def normalise_sts(fits: Any, block_size: int) -> Dict[str, List[float]]:
    """``sts_by_temperature`` checked (a mapping of decoding temperature >= 0 to block_size positive
    numbers) with its keys written as :func:`sts_key` writes them."""
    if not isinstance(fits, dict):
        raise ValueError(
            f"sts_by_temperature must map decoding temperatures to lists, got {type(fits).__name__}"
        )
    out: Dict[str, List[float]] = {}
    for k, v in fits.items():
        try:
            t = float(k)
        except (TypeError, ValueError):
            raise ValueError(
                f"sts_by_temperature: key {k!r} is not a decoding temperature (a number >= 0)"
            ) from None
        if not t >= 0:
            raise ValueError(f"sts_by_temperature: key {k!r} is not a decoding temperature (a number >= 0)")
        if not isinstance(v, (list, tuple)) or len(v) != block_size or not all(float(x) > 0 for x in v):
            raise ValueError(
                f"sts_by_temperature[{k!r}] must be {block_size} positive numbers (block_size), got {v!r}"
            )
        out[sts_key(t)] = [float(x) for x in v]
    return out


def resolve_drafter_config(
    drafter_cfg: Any, target_config: Dict[str, Any], mask_token_id: Optional[int] = None
) -> DrafterSpec:
    """Turn a user DrafterConfig (with 'auto' values) plus a target HF config dict into a DrafterSpec.

    ``mask_token_id`` is the tokenizer's mask id, used when the config says 'auto'.
    """
    validate_user_config(drafter_cfg, prefix="model")  # choices and ranges of model.*
    t = text_config(target_config)  # multimodal configs (Gemma 4) nest the LM config
    # The family check comes first: an unsupported target stops here, before any training.
    arch = family_for_target(str(t.get("model_type") or "qwen3")).arch(t)
    num_target_layers = int(t["num_hidden_layers"])
    ids = drafter_cfg.target_layer_ids
    if isinstance(ids, str):  # "auto" (validated above)
        ids = default_target_layer_ids(num_target_layers, int(drafter_cfg.num_target_features))
    ids = [int(i) for i in ids]
    check_layer_ids(ids, num_target_layers)

    mask = drafter_cfg.mask_token_id
    if isinstance(mask, str):  # "auto"
        if mask_token_id is None:
            raise ValueError(
                "model.mask_token_id='auto' but the tokenizer has no mask token; set "
                "model.mask_token_id to an embedding row no real text uses"
            )
        mask = mask_token_id

    kind = drafter_cfg.kind
    dflash = kind in ("dflash", "eagle3")  # neither has the Markov or the confidence head
    return DrafterSpec(
        **arch,
        num_layers=int(drafter_cfg.num_layers),
        num_target_layers=num_target_layers,
        target_hidden_size=arch["hidden_size"],
        target_layer_ids=ids,
        block_size=int(drafter_cfg.block_size),
        mask_token_id=int(mask),
        markov_rank=0 if dflash else int(drafter_cfg.markov_rank),
        markov_head_type=str(drafter_cfg.markov_head_type),
        enable_confidence_head=False if dflash else bool(drafter_cfg.enable_confidence_head),
        confidence_head_with_markov=bool(drafter_cfg.confidence_head_with_markov),
        greedy_confidence=not dflash
        and bool(drafter_cfg.enable_confidence_head)
        and bool(getattr(drafter_cfg, "greedy_confidence", False)),
        draft_vocab_size=int(getattr(drafter_cfg, "draft_vocab_size", 0) or 0),
        kind=str(kind),  # a plain string: the spec is written to json, yaml and model cards
        attn_impl=str(getattr(drafter_cfg, "attn_impl", "auto")),
        target_config=dict(target_config),
    )
