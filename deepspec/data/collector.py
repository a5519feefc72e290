"""Collect the offline target cache (format: deepspec/data/cache.py).

Same data path as online training (``train_examples``), so cached sequence i is online example i.
Shard k holds sequences [k·S, (k+1)·S) and belongs to rank k mod world; each rank writes its
shards atomically, the main process writes the manifest when all are done. A rerun with the same
settings keeps every finished shard whose bytes match its sidecar and computes the rest, so a
killed collection continues and ends with the same files as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import torch

from deepspec import atomic
from deepspec.data.batching import Example
from deepspec.data.cache import (
    FORMAT,
    HELDOUT,
    MANIFEST,
    PLAN,
    VERSION,
    CacheError,
    encode_features,
    finished_shard,
    format_bytes,
    shard_name,
    sidecar_path,
    size_estimate,
    target_config_hash,
    target_fingerprint,
    write_shard,
)
from deepspec.training.faults import maybe_kill

log = logging.getLogger("deepspec")
Features = Tuple[torch.Tensor, torch.Tensor]  # (aux [t, n·H], final [t, H]) of consecutive sequences


def examples_digest(examples: List[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(torch.tensor(e.input_ids, dtype=torch.int32).numpy().tobytes())
        h.update(torch.tensor(e.loss_mask, dtype=torch.uint8).numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


@torch.no_grad()
def hf_features(target, examples: List[Example], batch_size: int, pad_id: int) -> Iterator[Features]:
    """(aux [t, n·H], final [t, H]) of ``batch_size`` sequences at a time, from the target's forward
    over right-padded batches, padding cut off."""
    device = target.device
    for c in range(0, len(examples), batch_size):
        group = examples[c : c + batch_size]
        width = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(group), width), dtype=torch.long)
        for r, e in enumerate(group):
            ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
            attn[r, : len(e.input_ids)] = 1
        out = target(ids.to(device), attention_mask=attn.to(device))
        lens = [len(e.input_ids) for e in group]
        aux = torch.cat([out.aux[r, :n] for r, n in enumerate(lens)])
        final = torch.cat([out.final[r, :n] for r, n in enumerate(lens)])
        yield aux, final


def pack_shard(
    examples: List[Example], first_index: int, features: Iterable[Features], n_layers: int, dtype: str
) -> Dict[str, torch.Tensor]:
    """The shard's tensors: ids, masks, offsets and the features (in order, any grouping) encoded."""
    aux_parts: Dict[str, List[torch.Tensor]] = {}
    final_parts: Dict[str, List[torch.Tensor]] = {}
    for aux, final in features:
        # Encode per batch (same per-token result as encoding the whole shard), keep the stored form only.
        for parts, x, n in ((aux_parts, aux, n_layers), (final_parts, final, 1)):
            for k, v in encode_features(x, n, dtype).items():
                parts.setdefault(k, []).append(v.cpu())
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "loss_mask": torch.tensor([m for e in examples for m in e.loss_mask], dtype=torch.uint8),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "seq_index": torch.arange(first_index, first_index + len(examples), dtype=torch.int64),
        "aux": torch.cat(aux_parts["data"]),
        "final": torch.cat(final_parts["data"]),
    }
    if tensors["aux"].shape[0] != int(lengths.sum()):
        raise CacheError(
            f"features cover {tensors['aux'].shape[0]} tokens, the sequences {int(lengths.sum())}"
        )
    if dtype == "fp8":
        tensors["aux_scale"] = torch.cat(aux_parts["scale"])
        tensors["final_scale"] = torch.cat(final_parts["scale"])
    return tensors


def shard_tensors(
    target, examples: List[Example], first_index: int, batch_size: int, dtype: str, pad_id: int
) -> Dict[str, torch.Tensor]:
    """Forward the target over ``examples`` (right-padded batches) and pack the unpadded features."""
    feats = hf_features(target, examples, batch_size, pad_id)
    return pack_shard(examples, first_index, feats, len(target.layer_ids), dtype)


def _clear(cache_dir: Path) -> None:
    for p in cache_dir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _prepare_dir(cache_dir: Path, plan: dict, ccfg, heldout: List[dict]) -> None:
    """Main process: check an existing folder against the plan, clear what must go, write plan and held-out set."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan_p, man_p = cache_dir / PLAN, cache_dir / MANIFEST
    existing = [p for p in cache_dir.iterdir()]
    if plan_p.is_file():
        old = json.loads(plan_p.read_text())
        if old.get("key") != plan["key"]:
            if not ccfg.overwrite:
                diff = sorted(k for k in plan if k != "key" and old.get(k) != plan[k])
                raise CacheError(
                    f"{cache_dir} holds a different collection (differs in: {', '.join(diff) or 'key'}); "
                    "set collect.overwrite=true to replace it, or choose another collect.cache_dir"
                )
            _clear(cache_dir)
        elif not ccfg.resume:
            _clear(cache_dir)
    elif existing:
        if not ccfg.overwrite:
            raise CacheError(
                f"{cache_dir} is not empty and is not a cache (no {PLAN}); choose an empty folder "
                "or set collect.overwrite=true"
            )
        _clear(cache_dir)
    atomic.remove_stale(cache_dir)  # half-written files of a killed run: never valid, never read
    man_p.unlink(missing_ok=True)  # the cache is complete again only once every shard is verified
    atomic.write_json(plan_p, plan, sort_keys=True)
    atomic.write_jsonl(cache_dir / HELDOUT, ({k: v for k, v in r.items() if k != "where"} for r in heldout))


@contextlib.contextmanager
def _feature_source(cfg, target, path, examples, rng, todo, layer_ids, cache_dir: Path, pad_id: int):
    """``features(k)``: the (aux, final) batches of shard k, from the target's forward here (hf) or
    from vLLM (vllm; started once for every shard still to do, always stopped on leaving)."""
    cc = cfg.collect
    if cc.backend != "vllm":
        yield lambda k: hf_features(target, examples[rng[k][0] : rng[k][1]], cc.batch_size, pad_id)
        return
    if not todo:
        yield None
        return
    from deepspec.engine.features import VllmFeatureSource, aux_layout, iter_shard_features
    from deepspec.engine.procs import interrupt_on_sigterm

    layout = aux_layout(layer_ids, target.num_layers)
    part = {k: f"part-{k:05d}" for k in todo}
    parts = {part[k]: [list(e.input_ids) for e in examples[rng[k][0] : rng[k][1]]] for k in todo}
    local = Path(path)
    source = VllmFeatureSource(
        str(local.resolve()) if local.is_dir() else str(path),
        parts,
        layout,
        (cache_dir / "vllm-work").resolve(),
        dtype=str(cfg.target.dtype),
        tensor_parallel_size=cc.tensor_parallel_size,
        trust_remote_code=bool(cfg.target.trust_remote_code),
        vllm_python=cc.vllm_python,
        stall_timeout_s=cc.vllm_timeout_s,
        log=log.info,
    )
    log.info(
        "collect: features of %d shard(s) from vLLM (aux ids %s); log: %s",
        len(todo),
        layout.aux_ids,
        source.log_path,
    )
    with interrupt_on_sigterm(), source:
        yield lambda k: iter_shard_features(source, part[k], target.final_norm, cc.batch_size)


def collect(cfg, accelerator=None, progress_bar: bool = True) -> Path:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from deepspec.config import validate
    from deepspec.data.chat import template_kwargs_of
    from deepspec.models.config import resolve_drafter_config
    from deepspec.target.adapter import TargetModel
    from deepspec.target.loading import open_target
    from deepspec.training.setup import load_records, train_examples

    validate(cfg)  # every number and choice, before the target loads
    from deepspec.target.sharding import refuse_target_shard

    refuse_target_shard(cfg, "collect (deepspec/collect.py)")
    cc = cfg.collect
    if not cc.cache_dir:
        raise CacheError("collect.cache_dir is not set (the folder to write the cache into)")
    if cfg.data.source == "cache":
        raise CacheError(
            "collect reads data.source=tiny_chat or chat (the conversations to run the target on), not cache"
        )
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    cache_dir = Path(cc.cache_dir)

    info = open_target(cfg, acc)
    path, tokenizer, target_config, trc = info.path, info.tokenizer, info.config, info.trust_remote_code
    dc = resolve_drafter_config(cfg.model, target_config, mask_token_id=tokenizer.mask_token_id)
    if cc.backend == "vllm":
        if acc.num_processes > 1:
            raise CacheError(
                f"collect.backend=vllm runs in one process ({acc.num_processes} were launched): vLLM "
                "itself spreads the target over collect.tensor_parallel_size GPUs; start collect.py "
                "with plain python"
            )
        from deepspec.target.parts import TargetParts

        # The decoder layers load only inside vLLM; here just config, embedding, lm_head, final norm.
        target = TargetParts(path, cfg.target.dtype, trc)
        embed_w, head_w = target.embed_weight, target.lm_head_weight
    else:
        target = TargetModel.from_pretrained(path, dc.target_layer_ids, cfg.target.dtype, acc.device, trc)
        embed_w, head_w = target.embed_tokens.weight, target.lm_head.weight

    splits = load_records(cfg)
    examples = train_examples(cfg, tokenizer, splits[cc.split])
    n_seq = len(examples)
    n_tok = sum(len(e.input_ids) for e in examples)
    hidden, n_layers = target.hidden_size, len(dc.target_layer_ids)
    est = size_estimate(cc.dtype, hidden, n_layers, n_tok, n_seq)
    if acc.is_main_process:
        print(
            f"cache estimate: {n_seq:,} sequences, {n_tok:,} tokens; {cc.dtype}: {est['bytes_per_token']:.1f} bytes/token "
            f"(reference layout 6 + 2·H·(n+1) = {est['reference_bytes_per_token']:.0f} bytes/token with H={hidden}, "
            f"n={n_layers}: {est['ratio_to_reference']:.3f}x) -> total {format_bytes(est['total_bytes'])} "
            f"(reference {format_bytes(est['reference_total_bytes'])})",
            flush=True,
        )
    if cc.estimate_only:
        return cache_dir

    target_info = {
        "name_or_path": str(cfg.target.name_or_path),
        "resolved_path": str(path),
        "config_hash": target_config_hash(target.config.to_dict()),
        "fingerprint": target_fingerprint(embed_w, head_w),
        "hidden_size": hidden,
        "num_layers": target.num_layers,
        "model_type": target_config.get("model_type"),
        "vocab_size": target.vocab_size,
        "dtype": cfg.target.dtype,
    }
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "storage_dtype": cc.dtype,
        "layer_ids": list(dc.target_layer_ids),
        "target": {k: v for k, v in target_info.items() if k != "resolved_path"},
        "shard_sequences": cc.shard_sequences,
        "batch_size": cc.batch_size,
        "data": {
            "source": cfg.data.source,
            "path": cfg.data.path,
            "split": cc.split,
            "max_length": cfg.data.max_length,
            "num_sequences": n_seq,
            "num_tokens": n_tok,
            "digest": examples_digest(examples),
        },
    }
    if cc.backend == "vllm":  # only then: caches collected before the key existed keep their key
        plan["features_from"] = "vllm"
    plan["key"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]

    # A rerun of a complete or interrupted collection re-verifies every shard, recomputes what is
    # missing or corrupted, and rewrites the same manifest.
    if acc.is_main_process:
        _prepare_dir(cache_dir, plan, cc, splits.get("heldout", []))
    acc.wait_for_everyone()

    S = cc.shard_sequences
    num_shards = (n_seq + S - 1) // S
    mine = [k for k in range(num_shards) if k % acc.num_processes == acc.process_index]
    bar = tqdm(total=len(mine), desc="collect", disable=not (progress_bar and acc.is_main_process))
    rng = {k: (k * S, min(n_seq, (k + 1) * S)) for k in mine}
    todo = []
    for k in mine:
        a, b = rng[k]
        if finished_shard(cache_dir, k, {"shard": k, "sequences": [a, b], "key": plan["key"]}) is None:
            todo.append(k)
    kept = len(mine) - len(todo)
    bar.update(kept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    source = _feature_source(cfg, target, path, examples, rng, todo, dc.target_layer_ids, cache_dir, pad)
    with source as features:
        for k in todo:
            a, b = rng[k]
            info = {
                "shard": k,
                "sequences": [a, b],
                "key": plan["key"],
                "tokens": sum(len(e.input_ids) for e in examples[a:b]),
            }
            tensors = pack_shard(examples[a:b], a, features(k), n_layers, cc.dtype)
            write_shard(cache_dir, k, tensors, info)
            bar.update(1)
    bar.close()
    if kept:
        log.info("collect: kept %d finished shard(s) of an earlier run", kept)
    acc.wait_for_everyone()

    if acc.is_main_process:
        shards = []
        for k in range(num_shards):
            side_p, file_p = sidecar_path(cache_dir, k), cache_dir / shard_name(k)
            if not side_p.is_file() or not file_p.is_file():
                raise CacheError(f"{file_p}: shard missing after collection (did a rank fail?)")
            side = json.loads(side_p.read_text())
            if file_p.stat().st_size != side["bytes"]:
                raise CacheError(f"{file_p}: size differs from its sidecar")
            shards.append({key: side[key] for key in ("file", "sequences", "tokens", "bytes", "sha256")})
        n_loss = sum(sum(e.loss_mask) for e in examples)
        manifest = {
            **{k: v for k, v in plan.items() if k not in ("data",)},
            "target": target_info,
            "data": plan["data"],
            "hidden_size": hidden,
            "features": {
                "aux": {
                    "layers": list(dc.target_layer_ids),
                    "width": n_layers * hidden,
                    "dtype": cc.dtype,
                    "scale": "per token and layer, float32" if cc.dtype == "fp8" else None,
                },
                "final": {
                    "width": hidden,
                    "dtype": cc.dtype,
                    "scale": "per token, float32" if cc.dtype == "fp8" else None,
                },
                "input_ids": "int32",
                "loss_mask": "uint8",
            },
            "chat_template": tokenizer.chat_template,
            "template_kwargs": template_kwargs_of(cfg.data),
            "num_sequences": n_seq,
            "num_tokens": n_tok,
            "num_loss_tokens": int(n_loss),
            "heldout_records": len(splits.get("heldout", [])),
            "bytes_per_token": est["bytes_per_token"],
            "reference_bytes_per_token": est["reference_bytes_per_token"],
            "total_bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
        }
        maybe_kill("kill_before_manifest", 0)
        atomic.write_json(cache_dir / MANIFEST, manifest, sort_keys=True)
        print(
            f"cache written: {cache_dir} ({num_shards} shards, {format_bytes(manifest['total_bytes'])}, "
            f"{manifest['total_bytes'] / max(n_tok, 1):.1f} bytes/token)",
            flush=True,
        )
    acc.wait_for_everyone()
    return cache_dir
