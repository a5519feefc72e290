"""Write a drafter in any of the three formats, and load any of them back into a :class:`Drafter`.

Each export also carries ``deepspec_export.json``: what was written (format, dtype, whether the
embeddings were included), the drafter's *native* layer ids, and a logits probe of the original
drafter on a fixed input. Engines ignore it; the checker uses it to catch a layer-id offset and
to confirm, without the original checkpoint, that the export still computes the same logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from deepspec import atomic
from deepspec.config import ExportDtype, ExportFormat, allowed, check_choice
from deepspec.engine.serving import serving_settings
from deepspec.exporting.formats import (
    EMBED_KEYS,
    config_from_export,
    default_include_embeddings,
    format_config,
)
from deepspec.exporting.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExportInputError,
    check_output_dir,
    clean_leftovers,
    read_json,
    read_weights,
    write_weights,
)
from deepspec.exporting.native import DTYPES, check_drafter_maps, export_tensor
from deepspec.models import Drafter, build_drafter
from deepspec.models.config import DrafterSpec
from deepspec.models.vocab import ids_from_d2t

SIDECAR_NAME = "deepspec_export.json"
EXPORT_DTYPES = allowed(ExportDtype)


# --------------------------------------------------------------------------- fixed-input probe
def fixed_input(c: DrafterSpec, seed: int = 0, ctx_len: int = 12):
    """A deterministic batch (features, ids, anchors, previous tokens) any loader can rebuild from config."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, ctx_len, c.num_features * c.target_hidden_size, generator=g)
    ids = torch.randint(0, c.vocab_size, (1, ctx_len), generator=g)
    anchors = torch.tensor([[3, ctx_len - 4]])
    prev = torch.randint(0, c.vocab_size, (1, 2, c.block_size), generator=g)
    prev[:, :, 0] = torch.gather(ids, 1, anchors)  # x0 is the anchor itself
    return feats, ids, anchors, prev


@torch.no_grad()
def drafter_outputs(drafter: Drafter) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 logits [2, γ, V] and confidence logits on the fixed input: [2, γ] (the sampling output), or
    [2, γ, 2] (sampling, greedy) for a drafter with the greedy output, or None without a head."""
    p = next(drafter.parameters())
    if p.dtype == torch.float32 and p.device.type == "cpu":
        d = drafter
    else:
        # A CPU fp32 twin: the probe must not depend on the device or the training precision.
        d = build_drafter(drafter.config)
        d.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in drafter.state_dict().items()})
    was_training = d.training
    d.eval()
    out = d(*fixed_input(d.config))
    d.train(was_training)
    conf = out.confidence_logits[0].float().cpu() if out.confidence_logits is not None else None
    if out.greedy_confidence_logits is not None:
        conf = torch.stack([conf, out.greedy_confidence_logits[0].float().cpu()], dim=-1)
    return out.logits[0].float().cpu(), conf


def probe_ids(vocab_size: int, n: int = 32) -> torch.Tensor:
    return (
        torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1))[: min(n, vocab_size)]
        .sort()
        .values
    )


def make_probe(logits: torch.Tensor, conf: Optional[torch.Tensor]) -> Dict:
    """A small fingerprint of the logits: sampled columns, log-partition and argmax per slot."""
    ids = probe_ids(logits.shape[-1])
    return {
        "vocab_ids": ids.tolist(),
        "logits": logits[..., ids].tolist(),
        "logsumexp": torch.logsumexp(logits, -1).tolist(),
        "argmax": logits.argmax(-1).tolist(),
        "confidence_logits": conf.tolist() if conf is not None else None,
    }


def tolerance(dtype: str, scale: float) -> float:
    """Allowed max |Δlogit|: fp32 exports must match to float noise, bf16 to its ~3 significant digits
    through the layers (Gemma 4's unscaled attention scores roughly double the rounding error of the
    weights, hence 4%; a wrong tensor or layer id moves logits by O(1))."""
    rel = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 4e-2}.get(dtype, 4e-2)
    return rel * (1.0 + scale)


# --------------------------------------------------------------------------- write
def export_drafter(
    drafter: Drafter,
    out_dir: Union[str, Path],
    fmt: str,
    dtype: str = "bfloat16",
    include_embeddings: Optional[bool] = None,
    include_sts: bool = True,
    overwrite: bool = False,
    extra_files: Optional[Dict[str, Union[str, bytes, Path]]] = None,
    protected: Tuple[Path, ...] = (),
    source: str = "",
    verify: Optional[Callable[[Path], None]] = None,
    config: Optional[DrafterSpec] = None,
    overwrite_training_run: bool = False,
) -> Path:
    """Write ``drafter`` as ``fmt`` into ``out_dir`` atomically; ``verify(stage)`` runs before it appears.

    ``config`` replaces ``drafter.config`` for the written config (e.g. with the verifier's hub name).
    """
    check_choice("export.format", fmt, ExportFormat)
    check_choice("export.dtype", dtype, ExportDtype)
    c = config or drafter.config
    config = format_config(c, fmt, dtype, include_sts)  # refuses impossible formats before any write
    with_embed = default_include_embeddings(fmt, include_embeddings)
    out = Path(out_dir)
    check_output_dir(out, overwrite, protected, overwrite_training_run)

    # A pruned drafter's lm_head holds only its draft vocabulary's rows: an engine cannot share the
    # target's, so it is written even when the embeddings are left out.
    dropped = () if with_embed else (EMBED_KEYS[:1] if c.pruned else EMBED_KEYS)
    tensors = {
        k: export_tensor(v, DTYPES[dtype]) for k, v in drafter.state_dict().items() if k not in dropped
    }
    logits, conf = drafter_outputs(drafter)
    sidecar = {
        "format": fmt,
        "dtype": dtype,
        "embeddings_included": with_embed,
        "sts_included": bool(include_sts and c.sts_temperatures is not None),
        "target_layer_ids": list(c.target_layer_ids),
        "num_target_layers": c.num_target_layers,
        "block_size": c.block_size,
        "mask_token_id": c.mask_token_id,
        "vocab_size": c.vocab_size,
        "source": source,
        "probe": make_probe(logits, conf),
        # What vLLM's --speculative-config needs beyond the checkpoint (docs/engine.md).
        "serving": serving_settings(config, c.block_size, c.enable_confidence_head),
    }
    clean_leftovers(out.resolve())  # what a killed export of this folder left next to it
    with atomic.staged_dir(out.resolve(), fault="export") as stage:
        write_weights(stage, tensors)
        atomic.write_json(stage / CONFIG_NAME, config, sort_keys=True)
        atomic.write_json(stage / SIDECAR_NAME, sidecar, sort_keys=True)
        for name, content in (extra_files or {}).items():
            dest = stage / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                dest.write_bytes(content.read_bytes())
            else:
                dest.write_bytes(content.encode() if isinstance(content, str) else content)
        if verify is not None:
            verify(stage)
    return out


# --------------------------------------------------------------------------- read
def read_export_config(path: Union[str, Path]) -> Tuple[DrafterSpec, Dict]:
    p = Path(path)
    raw = read_json(p / CONFIG_NAME)
    return config_from_export(raw, str(p / CONFIG_NAME)), raw


def load_export(
    path: Union[str, Path],
    target_embed: Optional[torch.Tensor] = None,
    target_lm_head: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Drafter:
    """Load a native, speculators or z-lab DFlash folder. Omitted embedding/lm_head come from the target."""
    p = Path(path)
    c, _ = read_export_config(p)
    state = read_weights(p)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_drafter(c).state_dict().items()}
    if (
        c.pruned
        and "t2d" in state
        and target_embed is not None
        and state["t2d"].numel() != target_embed.shape[0]
    ):
        raise ExportInputError(
            f"{p / WEIGHTS_NAME}: the draft vocabulary maps a {state['t2d'].numel()}-token target vocabulary, "
            f"but the target's embedding has {target_embed.shape[0]} rows; pair it with the target it was trained against"
        )
    if not any(k in state for k in EMBED_KEYS[:1]):
        if target_embed is None or (EMBED_KEYS[1] not in state and target_lm_head is None):
            raise ExportInputError(
                f"{p / WEIGHTS_NAME} has no embed_tokens/lm_head (shared from the verifier); pass the target's "
                "embedding and lm_head weights (load_export(..., target_embed=..., target_lm_head=...) or --target)"
            )
        state = {**state, EMBED_KEYS[0]: target_embed}
        if EMBED_KEYS[1] not in state:
            head = target_lm_head
            if c.pruned and "d2t" in state and head.shape[0] == c.vocab_size:
                head = head.index_select(0, ids_from_d2t(state["d2t"]))  # the draft vocabulary's rows
            state[EMBED_KEYS[1]] = head
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ExportInputError(
            f"{p / WEIGHTS_NAME}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    bad = [
        f"{k}: {tuple(v.shape)} != expected {shapes[k]}"
        for k, v in state.items()
        if tuple(v.shape) != shapes[k]
    ]
    if bad:
        raise ExportInputError(f"{p / WEIGHTS_NAME}: wrong tensor shapes: {'; '.join(bad)}")
    drafter = build_drafter(c)
    drafter.load_state_dict(
        {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}
    )
    check_drafter_maps(drafter, str(p / WEIGHTS_NAME))
    drafter.freeze_target_head()
    return drafter.to(dtype).eval()


def resolve_checkpoint(path: Union[str, Path]) -> Tuple[Path, Optional[Path]]:
    """(drafter folder, training run folder or None) for a drafter folder or a training output dir."""
    p = Path(path)
    if not p.exists():
        raise ExportInputError(f"export.checkpoint={p} does not exist")
    if (p / CONFIG_NAME).exists() or (p / WEIGHTS_NAME).exists():
        # A run's own drafter/ folder: keep the run, so the card still finds eval.json and config.yaml.
        run = p.parent if p.name == "drafter" and (p.parent / "config.yaml").is_file() else None
        return p, run
    if (p / "drafter").is_dir():
        return p / "drafter", p
    if any((p / n).exists() for n in ("config.yaml", "metrics.jsonl", "run_info.json")):
        raise ExportInputError(
            f"{p / 'drafter'} not found: the training run in {p} has not finished (no drafter/ yet)"
        )
    raise ExportInputError(
        f"export.checkpoint={p} is neither a drafter folder (config.json + model.safetensors) "
        "nor a training output dir (with drafter/)"
    )
