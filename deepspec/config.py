"""Typed configuration: one dataclass per stage, registered with Hydra's ConfigStore.

Hydra validates every override against these dataclasses, so a misspelt key or a wrong type
fails at start-up with the key's name (e.g. ``train.lrr=1`` -> "Key 'lrr' not in 'TrainConfig'").
Values that need the target to be known (layer ids, mask id) stay ``"auto"`` here and are
resolved once, in :func:`deepspec.models.config.resolve_drafter_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING  # noqa: F401  (re-exported for recipes that need it)


@dataclass
class TinyTargetConfig:
    """The embedded target: a small Qwen3-architecture LM trained here on a local text corpus."""

    corpus_dir: Optional[str] = None  # None = this Python's standard library sources
    corpus_glob: str = "**/*.py"
    heldout_fraction: float = 0.05  # share of files (by stable path hash) kept out of training
    max_files: int = 0  # 0 = every matching file
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    seq_len: int = 256
    batch_size: int = 16
    train_steps: int = 800
    lr: float = 3e-3
    warmup_steps: int = 50
    eval_batches: int = 20
    seed: int = 0
    cache_dir: str = ".cache/deepspec"  # built targets are kept here, keyed by config hash
    num_threads: int = 0  # 0 = torch default


@dataclass
class TargetConfig:
    # "tiny" builds (or reuses) the embedded target from `tiny`; anything else is a local folder
    # or hub id loaded with AutoModelForCausalLM.from_pretrained.
    name_or_path: str = "tiny"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False
    tiny: TinyTargetConfig = field(default_factory=TinyTargetConfig)


@dataclass
class DrafterConfig:
    kind: str = "dspark"  # dspark | dflash (select with model=dflash: markov off, CE only, no confidence head)
    num_layers: int = 2
    block_size: int = 7
    target_layer_ids: Any = "auto"  # "auto" or a list of strictly increasing ids (-1 = embeddings)
    num_target_features: int = 5  # how many layers "auto" picks (fewer on small targets)
    mask_token_id: Any = "auto"  # "auto" = the tokenizer's mask token, else an embedding row
    markov_rank: int = 256  # 0 turns the Markov head off
    markov_head_type: str = "vanilla"  # vanilla | gated | rnn
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    init_std: float = 0.02


@dataclass
class LossConfig:
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    decay_gamma: float = 4.0  # slot weight w_k = exp(-(k-1)/decay_gamma); <= 0 disables decay


@dataclass
class DataConfig:
    source: str = "tiny_chat"  # tiny_chat = chat pairs cut from the tiny target's corpus
    max_length: int = 384  # tokens per training sequence (longer ones are truncated)
    num_anchors: int = 512  # anchors sampled per sequence (fewer if the sequence has fewer)
    max_train_samples: int = 0  # 0 = all
    num_workers: int = 0


@dataclass
class TrainConfig:
    output_dir: str = "outputs/${run_name}"
    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.04
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    global_batch_size: int = 8  # sequences per optimizer step, over all ranks and micro-steps
    micro_batch_size: int = 4  # sequences per forward pass on one rank
    max_steps: int = 0  # 0 = derive from epochs
    epochs: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 (fp32 master weights, bf16 autocast)
    log_every: int = 10
    progress_bar: bool = True


@dataclass
class EvalConfig:
    enabled: bool = True  # run the evaluator at the end of training
    temperatures: List[float] = field(default_factory=lambda: [0.0, 1.0])
    max_new_tokens: int = 96
    num_prompts: int = 16  # prompts per dataset (0 = all)
    seed: int = 0
    # --- deepspec/evaluate.py (standalone evaluation) ---
    drafter: str = ""  # a native drafter folder, or a training output dir holding drafter/
    output_dir: str = ""  # "" = <drafter run dir>/eval (or outputs/eval-${run_name})
    # tiny | gsm8k | humaneval | mt-bench | a local .jsonl/.json/.parquet with a "turns" list |
    # any other hub dataset id (read with dataset_split / prompt_column)
    datasets: List[str] = field(default_factory=lambda: ["tiny"])
    dataset_split: str = "test"  # split of a hub dataset that is not one of the named ones
    prompt_column: str = "turns"  # column of a hub/local dataset: a list of turns or one string
    baseline: bool = True  # also decode with the plain target (tokens/s, greedy identity check)
    progress_bar: bool = True
    num_threads: int = 0  # torch intra-op threads for evaluate.py (0 = torch default)
    # --- confidence calibration (SPEC §4) ---
    calibration: bool = True  # ECE/AUC/Brier, STS, threshold sweep (needs a confidence head)
    calibration_fraction: float = 0.5  # share of prompts whose rounds fit STS; the rest evaluate it
    ece_bins: int = 15
    sts_fit_temperature: float = 1.0  # decoding temperature whose STS fit is stored in the drafter
    save_sts: bool = False  # write sts_temperatures into the drafter's config.json (re-save)
    thresholds: List[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(20)])
    # --- scheduler simulation (SPEC §5) ---
    scheduler: bool = True  # profile SPS(B) and replay rounds for R concurrent requests
    concurrency: List[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    sps_profile: str = ""  # a saved sps.json to reuse instead of profiling
    profile_repeats: int = 10  # timed passes over all batch sizes (fastest kept per size)
    profile_context: int = 64  # tokens of KV cache each profiled request attends to
    plots: bool = True


@dataclass
class ExportConfig:
    """`python deepspec/export.py export.checkpoint=DIR export.format=speculators ...` (see docs/export.md)."""

    checkpoint: Optional[str] = None  # a drafter folder (any format) or a training output dir (uses drafter/)
    format: str = "speculators"  # native | speculators (vLLM) | dflash (z-lab; no Markov/confidence head)
    output_dir: Optional[str] = None  # None = <run>/export/<format>, or <drafter folder>-<format>
    dtype: str = "bfloat16"  # bfloat16 | float32
    include_embeddings: Optional[bool] = None  # None = format default (native/speculators yes, dflash never)
    include_sts: bool = True  # write the STS temperatures when the drafter has them
    overwrite: bool = False  # replace a non-empty output_dir
    check: bool = True  # run the checker on the staged export before it appears
    target: Optional[str] = None  # local target folder for the checker (None = the run's target if local)
    base_model: Optional[str] = None  # hub id of the target for the card / verifier (None = from the run)
    license: str = "apache-2.0"
    library_name: str = "deepspec"
    card: bool = True  # write README.md (model card) into the export
    after_training: bool = True  # export_after_training() runs at the end of `train.py`
    push_to_hub: bool = False
    repo_id: Optional[str] = None  # 'user/name'
    private: bool = False
    revision: Optional[str] = None  # branch to push to (created if missing); None = main
    commit_message: str = "Upload DSpark drafter"
    dry_run: bool = False  # build the export and print what would be uploaded; upload nothing


@dataclass
class DeepSpecConfig:
    run_name: str = "tiny"
    target: TargetConfig = field(default_factory=TargetConfig)
    model: DrafterConfig = field(default_factory=DrafterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="deepspec_schema", node=DeepSpecConfig)
