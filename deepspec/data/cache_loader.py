"""Offline training: target features of a batch read from the cache, with a background prefetcher.

The training order is a pure function of (seed, step) (deepspec/data/batching.py), so the
features a rank needs for the next steps are known in advance: a background thread reads them
(still in their storage dtype) ``data.prefetch_steps`` optimizer steps ahead; the trainer decodes
them on its device. The step of a batch is recovered from its sample keys, so a run that starts
at step k (resumed) or slices batches differently still gets the right features: a batch the
prefetcher did not predict is simply read on the spot.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, List, Optional

import torch

from deepspec.data.anchors import anchor_candidates
from deepspec.data.batching import Example, epoch_order, global_indices
from deepspec.data.cache import (
    CachedSequence,
    CacheError,
    CacheReader,
    target_config_hash,
    target_fingerprint,
)
from deepspec.eval.datasets import heldout_eval_records
from deepspec.target.adapter import TargetOutput

log = logging.getLogger("deepspec")


class PrefetchingFeatures:
    """``batch -> TargetOutput`` (aux [B, L, n·H], final [B, L, H]) from cached sequences."""

    def __init__(
        self,
        reader: CacheReader,
        num_samples: int,
        seed: int,
        global_batch: int,
        rank: int = 0,
        world: int = 1,
        depth: int = 4,
        dtype=torch.float32,
        lengths: Optional[List[int]] = None,
    ) -> None:
        self.reader, self.n, self.seed, self.global_batch = reader, num_samples, seed, global_batch
        self.rank, self.world, self.depth, self.dtype = rank, world, max(0, depth), dtype
        self.lengths = lengths
        self._inverse: Dict[int, torch.Tensor] = {}
        self.cond = threading.Condition()
        self.ready: Dict[int, Dict[int, CachedSequence]] = {}
        self.consumer = 0  # the step the trainer is at
        self.cursor = 0  # the next step the thread reads
        self.generation = 0  # bumped when the trainer jumps; stale reads are dropped
        self.error: Optional[BaseException] = None
        self.closed = False
        self.hits = self.misses = 0
        self.thread = None
        if self.depth > 0:
            self.thread = threading.Thread(target=self._worker, name="cache-prefetch", daemon=True)
            self.thread.start()

    # -- which samples a step needs on this rank (the slice the training loop takes)
    def _indices(self, step: int) -> List[int]:
        keys = global_indices(self.n, self.seed, step, self.global_batch)
        per = self.global_batch // self.world
        return [i for _, i in keys[self.rank * per : (self.rank + 1) * per]]

    def _step_of(self, key) -> int:
        epoch, idx = key
        inv = self._inverse.get(epoch)
        if inv is None:
            inv = torch.argsort(epoch_order(self.n, self.seed, epoch))
            self._inverse = {epoch: inv}
        return (epoch * self.n + int(inv[idx])) // self.global_batch

    def _worker(self) -> None:
        while True:
            with self.cond:
                while not self.closed and self.cursor >= self.consumer + self.depth:
                    self.cond.wait()
                if self.closed:
                    return
                step, gen = self.cursor, self.generation
                self.cursor += 1
            try:
                data = {i: self.reader.load(i) for i in self._indices(step)}
            except BaseException as e:  # surfaced to the trainer on its next batch
                with self.cond:
                    self.error = e
                    self.cond.notify_all()
                return
            with self.cond:
                if gen == self.generation:
                    self.ready[step] = data
                    self.cond.notify_all()

    def _prefetched(self, step: int) -> Dict[int, CachedSequence]:
        with self.cond:
            if step != self.consumer:
                for s in [s for s in self.ready if s < step]:
                    del self.ready[s]  # steps behind the trainer are done
                if step < self.consumer or step > self.cursor:
                    self.generation += 1  # a jump (e.g. a resumed run): read from here on
                    self.cursor = step
                    self.ready.clear()
                self.consumer = step
                self.cond.notify_all()
            if self.thread is None:
                return {}
            while step not in self.ready and self.error is None and self.thread.is_alive():
                self.cond.wait(timeout=1.0)
            if self.error is not None:
                raise CacheError(f"reading the cache failed: {self.error}") from self.error
            return self.ready.get(step, {})

    def __call__(self, batch) -> TargetOutput:
        if batch.keys is None:
            raise CacheError(
                "offline training needs batches with sample keys (deepspec.data.batching.collate)"
            )
        data = self._prefetched(self._step_of(batch.keys[0]))
        device = batch.input_ids.device
        b, length = batch.input_ids.shape
        aux = final = None
        for r, (_, i) in enumerate(batch.keys):
            seq = data.get(i)
            if seq is None:
                self.misses += 1
                seq = self.reader.load(i)
            else:
                self.hits += 1
            a, f = seq.decode(self.dtype, device)
            n = int(batch.attention_mask[r].sum())
            if a.shape[0] < n:
                raise CacheError(f"cached sequence {i} has {a.shape[0]} tokens, the batch row has {n}")
            if aux is None:
                aux = torch.zeros((b, length, a.shape[-1]), dtype=self.dtype, device=device)
                final = torch.zeros((b, length, f.shape[-1]), dtype=self.dtype, device=device)
            aux[r, :n], final[r, :n] = a[:n], f[:n]
        return TargetOutput(aux=aux, final=final)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def open_run_cache(cfg, target_path: str, target, drafter_config, accelerator=None):
    """(training examples, eval records, feature source) of a ``data.source=cache`` run, after checking
    that the cache was made from this target for the drafter's layer ids."""
    if not cfg.data.cache_dir:
        raise CacheError("data.source=cache needs data.cache_dir (a folder written by deepspec/collect.py)")
    reader = CacheReader(cfg.data.cache_dir, verify=cfg.data.verify_cache)
    reader.check_compatible(
        layer_ids=drafter_config.target_layer_ids,
        hidden_size=target.hidden_size,
        config_hash=target_config_hash(target.config.to_dict()),
        fingerprint=target_fingerprint(target.embed_tokens.weight, target.lm_head.weight),
        target_name=target_path,
    )
    data = reader.token_data()
    if cfg.data.max_train_samples > 0:
        data = data[: cfg.data.max_train_samples]
    stored_max = reader.manifest["data"].get("max_length")
    if stored_max is not None and cfg.data.max_length < stored_max:
        log.info(
            "truncating cached sequences to data.max_length=%d (collected with %d)",
            cfg.data.max_length,
            stored_max,
        )
    examples = [Example(ids[: cfg.data.max_length], mask[: cfg.data.max_length]) for ids, mask in data]
    # Cut shorter than collected, a sequence can lose its whole answer. It is kept (the prefetcher
    # indexes the cache by position) but adds nothing to the loss: say how many.
    cut = stored_max is not None and cfg.data.max_length < stored_max
    empty = sum(not anchor_candidates(torch.tensor(e.loss_mask)).numel() for e in examples) if cut else 0
    if empty:
        log.warning(
            "%d of %d cached sequences have no answer token within data.max_length=%d and train "
            "nothing; raise data.max_length (collected with %s)",
            empty,
            len(examples),
            cfg.data.max_length,
            stored_max,
        )
    eval_records = heldout_eval_records(reader.heldout_records(), cfg.eval)
    rank, world = (
        (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    )
    dtype = next(target.model.parameters()).dtype
    source = PrefetchingFeatures(
        reader,
        len(examples),
        cfg.train.seed,
        cfg.train.global_batch_size,
        rank,
        world,
        cfg.data.prefetch_steps,
        dtype,
    )
    log.info(
        "offline cache %s: %d sequences, %s storage, layers %s",
        cfg.data.cache_dir,
        len(examples),
        reader.storage_dtype,
        reader.manifest["layer_ids"],
    )
    return examples, eval_records, source
