"""Typed configuration: one dataclass per stage, registered with Hydra's ConfigStore.

Hydra validates every override against these dataclasses, so a misspelt key, a wrong type or a choice
outside its Enum (deepspec/config/choices.py) fails at start-up with the key's name (e.g.
``train.lrr=1`` -> "Key 'lrr' not in 'TrainConfig'"). Ranges of numbers and checks across keys are in
deepspec/config/validate.py, which every entry point runs before it loads anything.
Values that need the target to be known (layer ids, mask id) stay ``"auto"`` here and are
resolved once, in :func:`deepspec.models.config.resolve_drafter_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING  # noqa: F401  (re-exported for recipes that need it)

from deepspec.config.choices import (
    AttnImpl,
    CacheDtype,
    CollectBackend,
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
    TargetShard,
    TinyFamily,
    TinyPreset,
)


@dataclass
class TinyTargetConfig:
    """The embedded target: a small LM (Qwen3 or Gemma 4 architecture) trained here on a local text corpus."""

    family: TinyFamily = TinyFamily.qwen3  # the embedded target's architecture (and so its drafter's)
    # A named size (deepspec/target/tiny_presets.py): it supplies the fields below that are left at
    # their defaults; a field set to anything else keeps its value.
    preset: TinyPreset = TinyPreset.default
    corpus_dir: Optional[str] = None  # None = this Python's standard library sources
    corpus_glob: str = "**/*.py"
    heldout_fraction: float = 0.05  # share of files (by stable path hash) kept out of training
    max_files: int = 3000  # 0 = every matching file; a deterministic sample keeps the build short
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    seq_len: int = 512  # >= data.max_length (384): positions never trained on extrapolate badly
    batch_size: int = 8
    train_steps: int = 800
    lr: float = 3e-3
    warmup_steps: int = 40
    eval_batches: int = 20
    seed: int = 0
    cache_dir: str = ".cache/deepspec"  # built targets are kept here, keyed by config hash
    num_threads: int = 0  # 0 = torch default


@dataclass
class TargetConfig:
    # "tiny" builds (or reuses) the embedded target from `tiny`; anything else is a local folder
    # or hub id loaded with AutoModelForCausalLM.from_pretrained.
    name_or_path: str = "tiny"
    dtype: TargetDtype = TargetDtype.float32
    trust_remote_code: bool = False
    # Online training with 2+ processes: fsdp shards the frozen target's weights over the ranks
    # (deepspec/target/sharding.py; docs/training.md).
    shard: TargetShard = TargetShard.none
    tiny: TinyTargetConfig = field(default_factory=TinyTargetConfig)


@dataclass
class DrafterConfig:
    # dspark | dflash (model=dflash: markov off, CE only, no confidence head) | eagle3 (model=eagle3:
    # one autoregressive layer, training-time test, soft CE; see docs/benchmarks.md)
    kind: DrafterKind = DrafterKind.dspark
    num_layers: int = 2
    block_size: int = 7
    target_layer_ids: Any = "auto"  # "auto" or a list of strictly increasing ids (-1 = embeddings)
    num_target_features: int = 5  # how many layers "auto" picks (fewer on small targets)
    mask_token_id: Any = "auto"  # "auto" = the tokenizer's mask token, else an embedding row
    markov_rank: int = 256  # 0 turns the Markov head off
    markov_head_type: MarkovHeadType = MarkovHeadType.vanilla
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # A second confidence output trained on greedy acceptance (draft = target argmax), used at T = 0;
    # the first output keeps the sampling acceptance 1 - TV(q, p) (docs/method.md, Confidence head)
    greedy_confidence: bool = True
    init_std: float = 0.02
    # 0 = the target's whole vocabulary; d > 0 keeps the d target tokens most frequent in the training
    # answers (plus the tokens decoding needs: EOS, end of turn, ...) as the drafter's output vocabulary
    draft_vocab_size: int = 0
    attn_impl: AttnImpl = AttnImpl.auto  # auto = flex attention on CUDA when available, else SDPA


@dataclass
class LossConfig:
    ce_weight: float = 0.1
    l1_weight: float = 0.9
    confidence_weight: float = 1.0
    greedy_confidence_weight: float = 1.0  # BCE of the greedy confidence output (model.greedy_confidence)
    decay_gamma: float = 4.0  # slot weight w_k = exp(-(k-1)/decay_gamma); <= 0 disables decay
    soft_ce_weight: float = 0.0  # -Σ_v p_k(v) log q_k(v), CE to the target's distribution (EAGLE-3)
    # lean: chunked over block positions, softmaxes recomputed in backward (deepspec/losses/vocab_terms.py);
    # reference: the literal version that holds fp32 softmaxes of draft and target at once.
    impl: LossImpl = LossImpl.lean
    chunk_size: int = 0  # rows (block positions) per chunk of the lean loss; 0 = auto (by vocab and device)
    # Hand the loss the target's final hiddens + lm_head instead of its [B, A, γ, V] logits; the lean
    # loss computes them per chunk (one fewer batch x vocab tensor, two extra lm_head matmuls).
    lazy_target_logits: bool = False
    # Also the drafter's logits and the Markov bias a chunk of block positions at a time (lean loss
    # only): no [positions x vocab] tensor at all; the head matmuls are recomputed in backward.
    chunked_head: bool = False


@dataclass
class DataConfig:
    # tiny_chat = chat pairs cut from the tiny target's corpus; chat = conversations from `path`
    # (local jsonl/json/parquet or a hub dataset, e.g. the output of deepspec/regenerate.py);
    # cache = an offline target cache written by deepspec/collect.py (see docs/data.md)
    source: DataSource = DataSource.tiny_chat
    max_length: int = 384  # tokens per training sequence (longer ones are truncated)
    num_anchors: int = 512  # anchors sampled per sequence (fewer if the sequence has fewer)
    max_train_samples: int = 0  # 0 = all
    num_workers: int = 0
    # --- source=chat: where conversations come from and how they are read
    path: Optional[str] = None  # file, folder, glob (comma-separated for several) or hub dataset name
    hub_config: Optional[str] = None  # hub dataset configuration name
    hub_split: str = "train"  # split read from a hub dataset or a file
    messages_key: str = "auto"  # auto | messages | conversations | ... (the list of turns)
    id_key: str = "id"  # record id field; missing ids become "<file stem>:<line>" / "<index>"
    # malformed record: stop (raise, naming file/line/key) | skip (count and go on)
    on_error: OnError = OnError.stop
    heldout_fraction: float = 0.0  # share of records held out (by a stable hash of their id)
    heldout_max: int = 256  # at most this many held-out records are kept
    split_seed: int = 0  # salt of the held-out hash
    # Extra keyword arguments of the chat template, the same at generation, training and eval
    # (Qwen3: enable_thinking). None = pass nothing.
    enable_thinking: Optional[bool] = None
    # --- source=cache
    cache_dir: Optional[str] = None  # folder written by deepspec/collect.py
    verify_cache: bool = True  # check every shard's sha256 against the manifest before training
    prefetch_steps: int = 4  # optimizer steps of cached features read ahead by a background thread


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20  # 0 = off
    min_p: float = 0.0


@dataclass
class RegenerateConfig:
    """`python deepspec/regenerate.py regen.input=... regen.output=... [--resume]` (docs/data.md)."""

    input: Optional[str] = None  # prompts: like data.path (defaults to data.path)
    output: Optional[str] = None  # jsonl of regenerated conversations (errors go to <output>.errors.jsonl)
    errors: Optional[str] = None  # None = <output without .jsonl>.errors.jsonl
    # local (transformers on this machine) | openai (OpenAI-compatible servers)
    backend: RegenBackend = RegenBackend.local
    resume: bool = False  # continue an interrupted run (same settings) instead of refusing to overwrite
    overwrite: bool = False  # replace an existing output
    max_samples: int = 0  # 0 = all prompts
    max_turns: int = 1  # user turns answered per conversation (0 = all of them)
    max_new_tokens: int = 2048
    seed: int = 0  # per-sample seeds derive from (seed, sample id, turn)
    # Sampling: `sampling` in non-thinking mode, `thinking_sampling` when data.enable_thinking=true
    # (Qwen3 recommendations; recipes override them).
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    thinking_sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0)
    )
    # local backend
    batch_size: int = 16  # prompts per generate call (chunks of consecutive prompts)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    # openai backend
    urls: List[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    model: Optional[str] = None  # served model name (None = target.name_or_path)
    api_key: Optional[str] = None  # None = $OPENAI_API_KEY if set
    concurrency: int = 8  # requests in flight per URL
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0  # first retry delay; doubles each retry (with jitter), capped at 60 s


@dataclass
class CollectConfig:
    """`accelerate launch deepspec/collect.py collect.cache_dir=... collect.dtype=fp8` (docs/data.md)."""

    cache_dir: Optional[str] = None
    dtype: CacheDtype = CacheDtype.bf16  # fp8 = float8 e4m3 with a per-token, per-layer float32 scale
    shard_sequences: int = 128  # sequences per shard (a shard is built in memory: keep it a few GB)
    batch_size: int = 8  # sequences per target forward
    # which split of the data config is collected (the held-out records are copied)
    split: CollectSplit = CollectSplit.train
    resume: bool = True  # keep finished, verified shards of an earlier run with the same settings
    overwrite: bool = False  # delete an existing cache with different settings
    estimate_only: bool = False  # print the size estimate and exit
    # Where the features come from (docs/engine.md "Target features from vLLM"): hf = the target's
    # forward in this process; vllm = vLLM's extract_hidden_states, in vLLM's own environment.
    backend: CollectBackend = CollectBackend.hf
    tensor_parallel_size: int = 1  # backend=vllm: GPUs vLLM shards the target over
    vllm_python: Optional[str] = (
        None  # backend=vllm: a Python with vLLM (None = $DEEPSPEC_VLLM_PYTHON or the CPU env)
    )
    vllm_timeout_s: float = 1800.0  # backend=vllm: longest wait for vLLM to start or finish one shard


@dataclass
class CheckpointConfig:
    """Checkpoints under ``dir`` (docs/training.md): written atomically, pruned to last-K + best."""

    dir: str = "${train.output_dir}/checkpoints"
    every: int = 0  # optimizer steps between checkpoints (0 = only at the end)
    save_final: bool = True  # also checkpoint after the last step
    keep_last: int = 2  # newest checkpoints kept (>= 1)
    keep_best: bool = True  # also keep the one with the best held-out τ estimate
    heldout_sequences: int = 8  # held-out sequences scored (τ estimate from c*) at each checkpoint; 0 = off


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
    mixed_precision: MixedPrecision = MixedPrecision.no  # bf16 = fp32 master weights, bf16 autocast
    log_every: int = 10
    progress_bar: bool = True
    compile: bool = False  # torch.compile the drafter's forward (training step); eval stays eager
    compile_backend: str = "inductor"
    # --- launch (docs/training.md): "auto" = whatever `accelerate launch --config_file ...` set up
    strategy: Strategy = Strategy.auto
    deepspeed_config: Optional[str] = (
        None  # DeepSpeed json (None = the launcher's, else configs/deepspeed/zero<stage>.json)
    )
    # --- checkpoints and resume
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str = (
        "auto"  # auto (newest checkpoint in checkpoint.dir, if any) | none | a checkpoint or run folder
    )
    # NaN/inf loss: stop (name the step and the last good checkpoint) | skip (drop the step)
    on_nonfinite: OnNonfinite = OnNonfinite.stop
    max_skipped_steps: int = 10  # with on_nonfinite=skip, stop after this many skipped steps
    dry_run: bool = (
        False  # print the resolved config and the plan (steps, accumulation, tokens); load nothing
    )


@dataclass
class EvalConfig:
    enabled: bool = True  # run the evaluator at the end of training
    temperatures: List[float] = field(default_factory=lambda: [0.0, 1.0])
    max_new_tokens: int = 96
    num_prompts: int = 16  # prompts per dataset (0 = all)
    seed: int = 0
    # training's end-of-run evaluation: false = the first num_prompts held-out records; true = a
    # sample of them drawn with eval.seed (as evaluate.py draws), so seeds also vary the prompts
    sample_heldout: bool = False
    batch_size: int = 1  # prompts decoded together (per-row acceptance; tokens do not depend on it)
    draft_cache: bool = True  # keep the drafter's context keys/values between rounds (false: recompute)
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
    # --- confidence calibration (docs/evaluation.md) ---
    calibration: bool = True  # ECE/AUC/Brier, STS, threshold sweep (needs a confidence head)
    calibration_fraction: float = 0.5  # share of prompts whose rounds fit STS; the rest evaluate it
    ece_bins: int = 15
    # decoding temperature whose STS fit eval.save_sts stores; null = every decoded temperature's
    sts_fit_temperature: Optional[float] = None
    save_sts: bool = False  # write the per-temperature STS fits into the drafter's config.json (re-save)
    thresholds: List[float] = field(default_factory=lambda: [round(0.05 * i, 2) for i in range(20)])
    # --- scheduler simulation (docs/evaluation.md) ---
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
    # native | speculators (vLLM) | dflash (z-lab; no Markov/confidence head)
    format: ExportFormat = ExportFormat.speculators
    output_dir: Optional[str] = None  # None = <run>/export/<format>, or <drafter folder>-<format>
    dtype: ExportDtype = ExportDtype.bfloat16
    include_embeddings: Optional[bool] = None  # None = format default (native/speculators yes, dflash never)
    include_sts: bool = True  # write the STS temperatures when the drafter has them
    overwrite: bool = False  # replace a non-empty output_dir
    overwrite_training_run: bool = False  # let `overwrite` delete a folder that holds a training run
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
class LoggingConfig:
    """Metric sinks besides the console and metrics.jsonl (docs/training.md)."""

    tensorboard: bool = True  # event files in tensorboard_dir
    tensorboard_dir: str = "${train.output_dir}/tensorboard"
    wandb: bool = False  # Weights & Biases; WANDB_MODE=offline keeps it local (files under wandb_dir)
    wandb_project: str = "deepspec"
    wandb_entity: Optional[str] = None
    wandb_name: Optional[str] = None  # None = run_name
    wandb_tags: List[str] = field(default_factory=list)
    wandb_dir: str = "${train.output_dir}"  # wandb writes <wandb_dir>/wandb/
    console_every: int = 0  # a plain log line every N steps besides the progress bar (0 = train.log_every)


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    regen: RegenerateConfig = field(default_factory=RegenerateConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="deepspec_schema", node=DeepSpecConfig)
