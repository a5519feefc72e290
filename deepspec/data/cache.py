"""The offline target cache: on-disk format, size model, validation and reading.

A cache folder holds
  * ``shard-NNNNN.safetensors``: a fixed range of sequences, unpadded and concatenated on the token
    axis: ``input_ids`` int32 [T], ``loss_mask`` uint8 [T], ``offsets`` int64 [n+1] (sequence j is
    rows offsets[j]:offsets[j+1]), ``seq_index`` int64 [n] (global sequence numbers), ``aux``
    [T, n_layers·H] (the selected layers' outputs) and ``final`` [T, H] (the final-norm hidden),
    stored as bf16, or as float8 e4m3 with ``aux_scale`` float32 [T, n_layers] and ``final_scale``
    float32 [T, 1] (one scale per token and layer: x ≈ q·scale, scale = max|x| / 448);
  * ``shard-NNNNN.json``: the shard's sidecar (sha256, bytes, tokens, sequence range), written only
    after the shard file has been fsynced and renamed into place: a shard without a valid sidecar
    was never finished and is never read;
  * ``plan.json``: what is being collected (the collection key), written before the first shard;
  * ``heldout.jsonl``: the held-out conversations, for evaluation after offline training;
  * ``manifest.json``: written last, when every shard is done: target name, config hash and weight
    fingerprint, layer ids, hidden size, dtypes, chat template, counts, per-shard checksums.
    Its presence is what makes the cache complete.

Size per token: ids 4 + mask 1 + features; bf16: 2·H·(n+1); fp8: H·(n+1) + 4·(n+1) (scales).
The reference layout stores 6 + 2·H·(n+1) bytes per token.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from deepspec import atomic
from deepspec.config import CacheDtype, allowed
from deepspec.training.faults import maybe_kill

FORMAT = "deepspec-target-cache"
VERSION = 1
MANIFEST, PLAN, HELDOUT = "manifest.json", "plan.json", "heldout.jsonl"
STORAGE_DTYPES = allowed(CacheDtype)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_commit_hash",
    "_attn_implementation_autoset",
    "attn_implementation",
}


class CacheError(ValueError):
    """A cache that is incomplete, corrupted, or does not match the run; the message names the file/key."""


# ----------------------------------------------------------------------------- size model


def bytes_per_token(dtype: str, hidden: int, num_layers: int) -> float:
    """Bytes per token of this cache format (ids + mask + features + scales)."""
    if dtype not in STORAGE_DTYPES:
        raise CacheError(f"collect.dtype={dtype!r}: expected one of {STORAGE_DTYPES}")
    per = 4 + 1
    if dtype == "bf16":
        return per + 2 * hidden * (num_layers + 1)
    return per + hidden * (num_layers + 1) + 4 * (num_layers + 1)


def reference_bytes_per_token(hidden: int, num_layers: int) -> float:
    """The reference toolkit's layout: 6 + 2·H·(n+1) bytes per token."""
    return 6 + 2 * hidden * (num_layers + 1)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0
    return f"{n:.1f} PiB"


def size_estimate(
    dtype: str, hidden: int, num_layers: int, num_tokens: int, num_sequences: int
) -> Dict[str, float]:
    bpt = bytes_per_token(dtype, hidden, num_layers)
    ref = reference_bytes_per_token(hidden, num_layers)
    total = bpt * num_tokens + 16 * num_sequences  # + offsets and seq_index
    return {
        "bytes_per_token": bpt,
        "reference_bytes_per_token": ref,
        "ratio_to_reference": bpt / ref,
        "total_bytes": total,
        "reference_total_bytes": ref * num_tokens,
    }


# ----------------------------------------------------------------------------- encoding


def encode_features(x: torch.Tensor, num_parts: int, dtype: str) -> Dict[str, torch.Tensor]:
    """[T, num_parts·H] float -> stored tensors (``data`` and, for fp8, ``scale`` [T, num_parts])."""
    if dtype == "bf16":
        return {"data": x.to(torch.bfloat16).contiguous()}
    if dtype != "fp8":
        raise CacheError(f"storage dtype {dtype!r}: expected one of {STORAGE_DTYPES}")
    t = x.shape[0]
    parts = x.float().reshape(t, num_parts, -1)
    scale = (parts.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    q = (parts / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"data": q.reshape(t, -1).contiguous(), "scale": scale.contiguous()}


def decode_features(data: torch.Tensor, scale: Optional[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    if scale is None:
        return data.to(dtype)
    t, n = scale.shape
    return (data.float().reshape(t, n, -1) * scale.float()[..., None]).reshape(t, -1).to(dtype)


# ----------------------------------------------------------------------------- identity of a target


def target_config_hash(config_dict: dict) -> str:
    d = {k: v for k, v in config_dict.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def target_fingerprint(embed: torch.Tensor, lm_head: torch.Tensor, rows: int = 512) -> str:
    """A hash of evenly spaced rows of the embedding and lm_head (bf16, so fp32/bf16 loads agree)."""
    h = hashlib.sha256()
    for w in (embed, lm_head):
        step = max(1, w.shape[0] // rows)
        sample = w.detach()[::step].to("cpu", torch.bfloat16).contiguous()
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sidecar_path(cache_dir: Path, k: int) -> Path:
    return cache_dir / f"shard-{k:05d}.json"


def write_shard(cache_dir: Path, k: int, tensors: Dict[str, torch.Tensor], info: dict) -> dict:
    """Write shard k atomically (temp file, fsync, rename), then its sidecar; returns the sidecar."""
    final = cache_dir / shard_name(k)
    # One metadata key: safetensors writes a metadata map in no fixed order, and shards must be
    # byte-identical from run to run (resume, checksums).
    from safetensors.torch import save_file

    meta = {"deepspec": json.dumps({"format": FORMAT, "version": VERSION, "shard": k})}
    with atomic.atomic_path(final) as tmp:  # atomic.write_tensors, with a fault point inside
        save_file({n: v.contiguous() for n, v in tensors.items()}, str(tmp), metadata=meta)
        maybe_kill("kill_in_shard", k)
    maybe_kill("kill_before_sidecar", k)
    side = {**info, "file": final.name, "bytes": final.stat().st_size, "sha256": sha256_file(final)}
    atomic.write_json(sidecar_path(cache_dir, k), side, sort_keys=True)
    return side


def finished_shard(cache_dir: Path, k: int, expect: dict) -> Optional[dict]:
    """The sidecar of shard k if the shard is complete and its bytes match it, else None."""
    side_p, file_p = sidecar_path(cache_dir, k), cache_dir / shard_name(k)
    if not side_p.is_file() or not file_p.is_file():
        return None
    try:
        side = json.loads(side_p.read_text())
    except json.JSONDecodeError:
        return None
    if any(side.get(key) != v for key, v in expect.items()):
        return None
    if file_p.stat().st_size != side.get("bytes") or sha256_file(file_p) != side.get("sha256"):
        return None
    return side


# ----------------------------------------------------------------------------- reading


@dataclass
class CachedSequence:
    """Stored (not yet decoded) features of one sequence."""

    aux: torch.Tensor
    aux_scale: Optional[torch.Tensor]
    final: torch.Tensor
    final_scale: Optional[torch.Tensor]

    def decode(self, dtype=torch.float32, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        parts = [
            t.to(device) if (t is not None and device is not None) else t
            for t in (self.aux, self.aux_scale, self.final, self.final_scale)
        ]
        return decode_features(parts[0], parts[1], dtype), decode_features(parts[2], parts[3], dtype)


class CacheReader:
    """A complete cache: manifest, verified shards, token ids / masks, per-sequence features."""

    def __init__(self, cache_dir, verify: bool = True) -> None:
        self.dir = Path(cache_dir)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            hint = (
                " (collection has not finished: run collect again to resume it)"
                if (self.dir / PLAN).is_file()
                else ""
            )
            raise CacheError(f"{mpath}: no manifest{hint}")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise CacheError(f"{mpath}: not valid JSON ({e.msg})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CacheError(
                f"{mpath}: format {self.manifest.get('format')!r} v{self.manifest.get('version')!r}, "
                f"expected {FORMAT!r} v{VERSION}"
            )
        self.shards: List[dict] = self.manifest["shards"]
        self._starts = [s["sequences"][0] for s in self.shards]
        self.check_files(verify)
        self._handles: Dict[int, object] = {}
        self._lock = threading.Lock()
        self._offsets: Dict[int, List[int]] = {}

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def storage_dtype(self) -> str:
        return self.manifest["storage_dtype"]

    def check_files(self, verify: bool) -> None:
        """Every shard present with the manifest's size (and sha256 when ``verify``); names the bad shard."""
        for s in self.shards:
            p = self.dir / s["file"]
            if not p.is_file():
                raise CacheError(f"{p}: shard listed in the manifest is missing")
            size = p.stat().st_size
            if size != s["bytes"]:
                raise CacheError(
                    f"{p}: shard is {size} bytes, the manifest says {s['bytes']} (truncated or replaced)"
                )
            if verify and sha256_file(p) != s["sha256"]:
                raise CacheError(f"{p}: sha256 does not match the manifest (corrupted shard)")

    def check_compatible(
        self,
        *,
        layer_ids: Sequence[int],
        hidden_size: int,
        config_hash: Optional[str] = None,
        fingerprint: Optional[str] = None,
        target_name: Optional[str] = None,
    ) -> None:
        """Refuse a cache made from another target or for other layers than the drafter's."""
        m, t = self.manifest, self.manifest["target"]
        where = self.dir / MANIFEST
        if list(m["layer_ids"]) != list(layer_ids):
            raise CacheError(
                f"{where}: cache layer ids {m['layer_ids']} differ from the drafter's target_layer_ids "
                f"{list(layer_ids)} (model.target_layer_ids); collect again with these ids"
            )
        if int(t["hidden_size"]) != int(hidden_size):
            raise CacheError(
                f"{where}: cache hidden size {t['hidden_size']} differs from the target's {hidden_size}"
            )
        if config_hash is not None and t["config_hash"] != config_hash:
            raise CacheError(
                f"{where}: cache was collected from target {t['name_or_path']!r} (config hash "
                f"{t['config_hash']}), not from {target_name!r} (config hash {config_hash})"
            )
        if fingerprint is not None and t["fingerprint"] != fingerprint:
            raise CacheError(
                f"{where}: cache was collected from target {t['name_or_path']!r} whose weights differ "
                f"from {target_name!r} (embedding/lm_head fingerprint {t['fingerprint']} vs {fingerprint})"
            )

    def _handle(self, k: int):
        from safetensors import safe_open

        h = self._handles.get(k)
        if h is None:
            path = self.dir / self.shards[k]["file"]
            try:
                h = safe_open(str(path), framework="pt")
                self._offsets[k] = h.get_tensor("offsets").tolist()
            except Exception as e:  # safetensors' own error type, which names no file
                raise CacheError(
                    f"{path}: not a readable cache shard ({e}); it is damaged. Check the whole cache with "
                    "data.verify_cache=true, and re-collect (deepspec/collect.py keeps the shards that verify)"
                ) from None
            self._handles[k] = h
        return h

    def token_data(self) -> List[Tuple[List[int], List[int]]]:
        """(input_ids, loss_mask) of every sequence, in order."""
        out = []
        with self._lock:
            for k in range(len(self.shards)):
                h = self._handle(k)
                ids, mask, off = h.get_tensor("input_ids"), h.get_tensor("loss_mask"), self._offsets[k]
                for j in range(len(off) - 1):
                    out.append((ids[off[j] : off[j + 1]].tolist(), mask[off[j] : off[j + 1]].tolist()))
        if len(out) != self.num_sequences:
            raise CacheError(
                f"{self.dir}: shards hold {len(out)} sequences, the manifest says {self.num_sequences}"
            )
        return out

    def load(self, index: int) -> CachedSequence:
        """Stored features of global sequence ``index`` (only its rows are read)."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} not in cache of {self.num_sequences}")
        k = bisect.bisect_right(self._starts, index) - 1
        with self._lock:
            h = self._handle(k)
            j = index - self._starts[k]
            a, b = self._offsets[k][j], self._offsets[k][j + 1]
            fp8 = self.storage_dtype == "fp8"
            return CachedSequence(
                aux=h.get_slice("aux")[a:b],
                aux_scale=h.get_slice("aux_scale")[a:b] if fp8 else None,
                final=h.get_slice("final")[a:b],
                final_scale=h.get_slice("final_scale")[a:b] if fp8 else None,
            )

    def heldout_records(self) -> List[dict]:
        p = self.dir / HELDOUT
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
