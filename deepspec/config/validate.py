"""``validate(cfg)``: the one check of a configuration, run by every entry point before it loads anything.

The schema (deepspec/config/schema.py) already fixes keys, types and choices. What it cannot say is
here: the range of every number (:data:`RANGES`, also the table in docs/configuration.md), the choices
again for configs built without the schema (a plain dict or dataclass), and the rules that tie keys
together. Every message names the key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, Dict, Iterator, Optional, Tuple, Type

from deepspec.config.choices import allowed


class ConfigError(ValueError):
    """A configuration value outside what the key accepts."""


@dataclass(frozen=True)
class Range:
    """``lo <= v <= hi`` (``<`` where open); ``each``: the key holds a list, every element is checked."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    each: bool = False
    why: str = ""  # what the bounds mean, added to the error

    def holds(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def text(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}"

        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        return "finite"


def _ge(lo: float, why: str = "", each: bool = False) -> Range:
    return Range(lo=lo, why=why, each=each)


def _gt(lo: float, why: str = "", each: bool = False) -> Range:
    return Range(lo=lo, lo_open=True, why=why, each=each)


_UNIT = Range(0, 1)  # a probability or a share
_SHARE = Range(0, 1, hi_open=True, why="a share held out; 1 would leave nothing to train on")
_SEED = _ge(0, "numpy seeds are non-negative")
_THREADS = _ge(0, "0 = torch default")


def _sampling(prefix: str) -> Dict[str, Range]:
    return {
        f"{prefix}.temperature": _ge(0, "0 = greedy"),
        f"{prefix}.top_p": Range(0, 1, lo_open=True, why="1 = off"),
        f"{prefix}.top_k": _ge(0, "0 = off"),
        f"{prefix}.min_p": _UNIT,
    }


# Every int/float key of the schema (a test walks the schema and holds this table to it).
RANGES: Dict[str, Range] = {
    # target.tiny: the embedded target's build
    "target.tiny.heldout_fraction": _SHARE,
    "target.tiny.max_files": _ge(0, "0 = every matching file"),
    "target.tiny.vocab_size": _ge(261, "256 bytes + 4 special tokens + at least one merge"),
    "target.tiny.hidden_size": _ge(1),
    "target.tiny.num_layers": _ge(1),
    "target.tiny.num_heads": _ge(1),
    "target.tiny.num_kv_heads": _ge(1),
    "target.tiny.head_dim": _ge(1),
    "target.tiny.intermediate_size": _ge(1),
    "target.tiny.seq_len": _ge(2),
    "target.tiny.batch_size": _ge(1),
    "target.tiny.train_steps": _ge(1),
    "target.tiny.lr": _gt(0),
    "target.tiny.warmup_steps": _ge(0),
    "target.tiny.eval_batches": _ge(1),
    "target.tiny.seed": _SEED,
    "target.tiny.num_threads": _THREADS,
    # model
    "model.num_layers": _ge(1),
    "model.block_size": _ge(2, "anchor + at least one draft"),
    "model.num_target_features": _ge(1),
    "model.markov_rank": _ge(0, "0 = Markov head off"),
    "model.init_std": _gt(0),
    "model.draft_vocab_size": _ge(0, "0 = the target's whole vocabulary"),
    # loss
    "loss.ce_weight": _ge(0),
    "loss.l1_weight": _ge(0),
    "loss.confidence_weight": _ge(0),
    "loss.greedy_confidence_weight": _ge(0),
    "loss.soft_ce_weight": _ge(0),
    "loss.decay_gamma": Range(why="<= 0 = no slot decay"),
    "loss.chunk_size": _ge(0, "0 = auto"),
    # data
    "data.max_length": _ge(2, "an anchor and its first label"),
    "data.num_anchors": _ge(1, "blocks sampled per sequence; 0 would train on nothing"),
    "data.max_train_samples": _ge(0, "0 = all"),
    "data.num_workers": _ge(0),
    "data.heldout_fraction": _SHARE,
    "data.heldout_max": _ge(0, "0 = no cap"),
    "data.split_seed": _SEED,
    "data.prefetch_steps": _ge(0, "0 = read on the spot"),
    # regen
    **_sampling("regen.sampling"),
    **_sampling("regen.thinking_sampling"),
    "regen.max_samples": _ge(0, "0 = all prompts"),
    "regen.max_turns": _ge(0, "0 = all user turns"),
    "regen.max_new_tokens": _ge(1),
    "regen.seed": _SEED,
    "regen.batch_size": _ge(1),
    "regen.concurrency": _ge(1),
    "regen.timeout_s": _gt(0),
    "regen.max_retries": _ge(0),
    "regen.backoff_s": _ge(0),
    # collect
    "collect.shard_sequences": _ge(1),
    "collect.batch_size": _ge(1),
    "collect.tensor_parallel_size": _ge(1, "GPUs vLLM shards the target over (collect.backend=vllm)"),
    "collect.vllm_timeout_s": _gt(0),
    # train
    "train.lr": _gt(0),
    "train.weight_decay": _ge(0),
    "train.betas": Range(0, 1, hi_open=True, each=True, why="Adam's moment decays"),
    "train.warmup_ratio": _UNIT,
    "train.min_lr_ratio": _UNIT,
    "train.grad_clip": _ge(0, "0 = no clipping"),
    "train.global_batch_size": _ge(1),
    "train.micro_batch_size": _ge(1),
    "train.max_steps": _ge(0, "0 = from train.epochs"),
    "train.epochs": _gt(0),
    "train.seed": _SEED,
    "train.log_every": _ge(1),
    "train.max_skipped_steps": _ge(0),
    "train.checkpoint.every": _ge(0, "0 = only at the end"),
    "train.checkpoint.keep_last": _ge(1),
    "train.checkpoint.heldout_sequences": _ge(0, "0 = off"),
    # eval
    "eval.temperatures": _ge(0, "0 = greedy", each=True),
    "eval.max_new_tokens": _ge(1),
    "eval.batch_size": _ge(1, "prompts decoded together"),
    "eval.num_prompts": _ge(0, "0 = all"),
    "eval.seed": _SEED,
    "eval.num_threads": _THREADS,
    "eval.calibration_fraction": Range(0, 1, lo_open=True, hi_open=True, why="both halves need prompts"),
    "eval.ece_bins": _ge(2),
    "eval.sts_fit_temperature": _ge(0),
    "eval.thresholds": Range(0, 1, each=True, why="confidence thresholds"),
    "eval.concurrency": _ge(1, each=True),
    "eval.profile_repeats": _ge(1),
    "eval.profile_context": _ge(1),
    # logging
    "logging.console_every": _ge(0, "0 = train.log_every"),
}

# Numeric keys that also take "auto"; checked by :func:`_check_auto_ints`.
AUTO_INT_KEYS = ("model.target_layer_ids", "model.mask_token_id")
# List keys that must not be empty.
NONEMPTY = ("train.betas", "eval.temperatures", "eval.datasets", "eval.concurrency")


# ----------------------------------------------------------------------------- reading a config
_MISSING = object()


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        else:
            node = getattr(node, part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _show(v: Any) -> str:
    if isinstance(v, Enum):
        v = v.value
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return "[" + ", ".join(_show(x) for x in v) + "]"
    return repr(v)


def choice_fields(schema: Optional[type] = None, prefix: str = "") -> Iterator[Tuple[str, Type[Enum]]]:
    """(dotted key, Enum) of every choice field of the schema."""
    for key, tp in schema_fields(schema, prefix):
        if isinstance(tp, type) and issubclass(tp, Enum):
            yield key, tp


def schema_fields(schema: Optional[type] = None, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, type) of every leaf field of the schema (nested dataclasses walked into)."""
    if schema is None:
        from deepspec.config.schema import DeepSpecConfig

        schema = DeepSpecConfig
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from schema_fields(tp, key + ".")
        else:
            yield key, tp


# ----------------------------------------------------------------------------- the checks
def check_choice(key: str, value: Any, enum: Type[Enum]) -> None:
    """``value`` must be one of ``enum``'s values (a member or its plain string)."""
    v = value.value if isinstance(value, Enum) else value
    if v not in allowed(enum):
        raise ConfigError(f"{key}={_show(v)} is unknown; expected one of: {', '.join(allowed(enum))}")


def check_range(key: str, value: Any, rule: Range) -> None:
    values = list(value) if rule.each else [value]
    for v in values:
        if not rule.holds(v):
            what = f"{key}={_show(value)}" + (f": element {_show(v)}" if rule.each else "")
            why = f" ({rule.why})" if rule.why else ""
            raise ConfigError(f"{what}: must be {rule.text()}{why}")


# Numbers that may be left unset (null): the range applies once one is given.
UNSET_ALLOWED = {"eval.sts_fit_temperature"}  # null = every decoded temperature


def validate(cfg: Any, prefix: str = "") -> None:
    """Check every choice, range and cross-key rule of ``cfg``.

    ``cfg`` is the whole tree (DictConfig, dataclass or dict); with ``prefix`` (e.g. ``"model"``) it is
    that subtree only, and only the rules under it are checked. Keys the config lacks are skipped.
    """
    scope = prefix + "." if prefix else ""

    def get(key: str) -> Any:
        if not key.startswith(scope):
            return _MISSING
        return _get(cfg, key[len(scope) :])

    for key, enum in choice_fields():
        v = get(key)
        if v is not _MISSING and v is not None:
            check_choice(key, v, enum)
    for key in NONEMPTY:
        v = get(key)
        if v is not _MISSING and len(v) == 0:
            raise ConfigError(f"{key} is empty")
    for key, rule in RANGES.items():
        v = get(key)
        if v is not _MISSING and not (v is None and key in UNSET_ALLOWED):
            check_range(key, v, rule)
    _check_auto_ints(get)
    _check_across(get)


def _check_auto_ints(get) -> None:
    ids = get("model.target_layer_ids")
    if ids is not _MISSING and not (isinstance(ids, str) and ids == "auto"):
        if isinstance(ids, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"model.target_layer_ids={_show(ids)}: expected 'auto' or a list of ints")
        if not len(ids):
            raise ConfigError("model.target_layer_ids is empty; give at least one layer id or 'auto'")
        if min(ids) < -1:
            raise ConfigError(f"model.target_layer_ids={_show(ids)}: ids must be >= -1 (-1 = embeddings)")
    mask = get("model.mask_token_id")
    if mask is not _MISSING and not (isinstance(mask, str) and mask == "auto"):
        if isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
            raise ConfigError(
                f"model.mask_token_id={_show(mask)} is outside the target's embedding; expected 'auto' "
                "or an embedding row >= 0"
            )


def _check_across(get) -> None:
    kind, layers = get("model.kind"), get("model.num_layers")
    if kind == "eagle3" and layers is not _MISSING and layers != 1:
        raise ConfigError(
            f"model.num_layers={layers}: the EAGLE-3 drafter (model.kind=eagle3) has exactly one layer"
        )
    weights = {k: get(f"loss.{k}_weight") for k in ("ce", "l1", "confidence", "soft_ce")}
    if _MISSING not in weights.values():
        # The confidence term trains only the confidence head, which dflash / eagle3 drafters lack.
        no_head = kind in ("dflash", "eagle3") or get("model.enable_confidence_head") is False
        counted = {k: w for k, w in weights.items() if not (k == "confidence" and no_head)}
        if not any(counted.values()):
            raise ConfigError(
                f"loss weights {', '.join(f'loss.{k}_weight={w}' for k, w in counted.items())} are all 0"
                + (
                    " (loss.confidence_weight trains only a confidence head, which this drafter has not)"
                    if no_head and weights["confidence"]
                    else ""
                )
                + ": the drafter would learn nothing; give at least one a positive weight"
            )
    d = get("model.draft_vocab_size")
    if d not in (_MISSING, None, 0):
        if kind == "eagle3":
            raise ConfigError(
                f"model.draft_vocab_size={d}: the EAGLE-3 baseline drafts over the whole vocabulary here; "
                "use 0 or model.kind=dspark|dflash"
            )
        tiny_v = get("target.tiny.vocab_size")
        if get("target.name_or_path") == "tiny" and tiny_v is not _MISSING and d > tiny_v:
            raise ConfigError(
                f"model.draft_vocab_size={d} is larger than the target's vocabulary "
                f"(target.tiny.vocab_size={tiny_v}); expected 0 or a size in [1, {tiny_v}]"
            )
    g, m = get("train.global_batch_size"), get("train.micro_batch_size")
    if _MISSING not in (g, m) and g % m:
        raise ConfigError(
            f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} "
            "(global = processes x micro x accumulation steps)"
        )
    heads, kv = get("target.tiny.num_heads"), get("target.tiny.num_kv_heads")
    if _MISSING not in (heads, kv) and heads % kv:
        raise ConfigError(f"target.tiny.num_heads={heads} is not a multiple of target.tiny.num_kv_heads={kv}")
    if get("eval.save_sts") is True:
        t, temps = get("eval.sts_fit_temperature"), get("eval.temperatures")
        if t not in (None, _MISSING) and float(t) not in [float(x) for x in temps]:
            raise ConfigError(
                f"eval.save_sts: eval.sts_fit_temperature={t} is not one of eval.temperatures={_show(temps)}"
            )
    tp, backend = get("collect.tensor_parallel_size"), get("collect.backend")
    if _MISSING not in (tp, backend) and tp > 1 and backend != "vllm":
        raise ConfigError(
            f"collect.tensor_parallel_size={tp} needs collect.backend=vllm (the hf backend holds the "
            "whole target in every process)"
        )
    if get("train.resume") == "":
        raise ConfigError("train.resume is empty: use auto, none, or a checkpoint / run folder")


def choice_table() -> str:
    """The markdown table of every choice key and its allowed values (also in docs/configuration.md)."""
    rows = ["| key | allowed values |", "| --- | --- |"]
    rows += [f"| `{key}` | {' / '.join(allowed(enum))} |" for key, enum in choice_fields()]
    return "\n".join(rows)


def range_table() -> str:
    """The markdown table of :data:`RANGES` (docs/configuration.md holds a copy; a test compares them)."""
    rows = ["| key | allowed | note |", "| --- | --- | --- |"]
    for key, rule in RANGES.items():
        what = ("each element " if rule.each else "") + rule.text()
        rows.append(f"| `{key}` | {what} | {rule.why} |")
    return "\n".join(rows)
