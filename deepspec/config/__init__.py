"""Typed configuration (schema.py), its choices (choices.py) and the one start-up check (validate.py)."""

from deepspec.config.choices import (  # noqa: F401
    AttnImpl,
    CacheDtype,
    CollectSplit,
    DataSource,
    DrafterKind,
    ExportDtype,
    ExportFormat,
    LossImpl,
    MarkovHeadType,
    MixedPrecision,
    OnError,
    OnNonfinite,
    RegenBackend,
    Strategy,
    TargetDtype,
    allowed,
)
from deepspec.config.schema import (  # noqa: F401
    MISSING,
    CheckpointConfig,
    CollectConfig,
    DataConfig,
    DeepSpecConfig,
    DrafterConfig,
    EvalConfig,
    ExportConfig,
    LoggingConfig,
    LossConfig,
    RegenerateConfig,
    SamplingConfig,
    TargetConfig,
    TinyTargetConfig,
    TrainConfig,
    register_configs,
)
from deepspec.config.validate import RANGES, ConfigError, Range, check_choice, validate  # noqa: F401
