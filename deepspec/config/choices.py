"""The allowed values of every choice key, as Enums the schema types its fields with.

OmegaConf checks an Enum-typed field on every merge, so ``train.mixed_precision=fp16`` stops at
start-up with the key and the allowed values. Members are ``StrEnum``s named like their values: they
compare equal to the plain strings (``cfg.train.mixed_precision == "bf16"``), print as them, and
``config.yaml`` stores them as them.
"""

from __future__ import annotations

from enum import Enum, StrEnum
from typing import Tuple, Type


class TargetDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class TargetShard(StrEnum):
    none = "none"  # every rank holds the whole frozen target
    fsdp = "fsdp"  # FSDP2 fully_shard of the frozen target: each rank holds about 1/world of it


class TinyFamily(StrEnum):
    qwen3 = "qwen3"
    gemma4 = "gemma4"  # Gemma 4 text layers: the Gemma drafter path with no download


class TinyPreset(StrEnum):
    default = "default"  # the fields as given (6 layers x 128): builds in minutes
    base = "base"  # 12 layers x 192, trained longer: a stronger target for drafter comparisons


class DrafterKind(StrEnum):
    dspark = "dspark"  # parallel block drafter + Markov head + confidence head
    dflash = "dflash"  # the same backbone with both heads off
    eagle3 = "eagle3"  # one autoregressive layer, training-time test


class MarkovHeadType(StrEnum):
    vanilla = "vanilla"
    gated = "gated"
    rnn = "rnn"


class AttnImpl(StrEnum):
    auto = "auto"  # flex attention on CUDA when importable, else sdpa
    sdpa = "sdpa"
    flex = "flex"


class LossImpl(StrEnum):
    lean = "lean"  # chunked over block positions, softmaxes recomputed in backward
    reference = "reference"  # the literal full-vocabulary version


class DataSource(StrEnum):
    tiny_chat = "tiny_chat"
    chat = "chat"
    cache = "cache"


class OnError(StrEnum):
    stop = "stop"
    skip = "skip"


class RegenBackend(StrEnum):
    local = "local"
    openai = "openai"


class CacheDtype(StrEnum):
    bf16 = "bf16"
    fp8 = "fp8"


class CollectBackend(StrEnum):
    hf = "hf"  # the target loaded here with transformers (accelerate launch: one copy per process)
    vllm = "vllm"  # vLLM's extract_hidden_states: vLLM shards the target (tensor/expert parallel)


class CollectSplit(StrEnum):
    train = "train"
    heldout = "heldout"


class MixedPrecision(StrEnum):
    no = "no"
    bf16 = "bf16"


class Strategy(StrEnum):
    auto = "auto"
    single = "single"
    ddp = "ddp"
    deepspeed = "deepspeed"
    fsdp = "fsdp"


class OnNonfinite(StrEnum):
    stop = "stop"
    skip = "skip"


class ExportFormat(StrEnum):
    native = "native"
    speculators = "speculators"
    dflash = "dflash"


class ExportDtype(StrEnum):
    bfloat16 = "bfloat16"
    float32 = "float32"


def allowed(enum: Type[Enum]) -> Tuple[str, ...]:
    return tuple(m.value for m in enum)
