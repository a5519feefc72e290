"""Everything a run needs before its first step: target, tokenizer, resolved drafter, data, output dir."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from deepspec.config import DataSource, check_choice
from deepspec.data.anchors import anchor_candidates
from deepspec.data.batching import Example
from deepspec.eval.datasets import heldout_eval_records
from deepspec.exporting.formats import check_format_carries
from deepspec.models import Drafter, build_drafter
from deepspec.models.config import DrafterSpec, resolve_drafter_config
from deepspec.models.vocab import always_kept_ids, answer_token_counts, select_draft_ids
from deepspec.target.adapter import TargetModel, TargetOutput
from deepspec.target.loading import open_target
from deepspec.target.sharding import local_param_bytes

log = logging.getLogger("deepspec")


@dataclass
class RunSetup:
    cfg: object
    out_dir: Path
    target_path: str
    tokenizer: object
    target: TargetModel
    drafter: Drafter
    drafter_config: DrafterSpec
    train_examples: List[Example]
    eval_records: List[dict]
    pad_id: int
    heldout_records: Optional[List[dict]] = None  # held-out chat records (checkpoint-time τ estimate)
    feature_source: Optional[Callable] = None  # data.source=cache: batch -> TargetOutput from the cache
    info: Optional[dict] = None  # run_info.json, written once the start is accepted
    draft_ids: Optional[torch.Tensor] = None  # model.draft_vocab_size > 0: target id of each draft id

    @property
    def lm_head(self):
        return self.target.lm_head

    def features(self, batch) -> TargetOutput:
        """Target features of a training batch: a target forward (online), or read from the offline cache."""
        if self.feature_source is not None:
            return self.feature_source(batch)
        return self.online_features(batch)

    def online_features(self, batch) -> TargetOutput:
        """A target forward. Held-out sequences always take this path: the cache holds only the
        training split, and its keys would name training sequences."""
        return self.target(batch.input_ids, attention_mask=batch.attention_mask)


def load_records(cfg) -> dict:
    """{"train": [...], "heldout": [...]} chat records ({"id", "messages"}).

    data.source: tiny_chat (pairs cut from the tiny target's corpus), chat (data.path: local files
    or a hub dataset, e.g. regenerated answers), cache (held-out records stored with an offline
    cache; its training sequences are read by deepspec.data.cache_loader)."""
    check_choice("data.source", cfg.data.source, DataSource)
    if cfg.data.source == "tiny_chat":
        from deepspec.data.tiny_chat import tiny_chat_splits

        return tiny_chat_splits(cfg.target.tiny)
    if cfg.data.source == "chat":
        from deepspec.data.prompts import load_chat_splits

        return load_chat_splits(cfg.data)
    else:  # cache
        from deepspec.data.cache import CacheReader

        if not cfg.data.cache_dir:
            raise ValueError(
                "data.source=cache needs data.cache_dir (a folder written by deepspec/collect.py)"
            )
        return {"train": [], "heldout": CacheReader(cfg.data.cache_dir, verify=False).heldout_records()}


def _has_anchor(mask: List[int]) -> bool:
    return anchor_candidates(torch.tensor(mask, dtype=torch.long)).numel() > 0


def tokenize_records(
    records: List[dict], tokenizer, max_length: int, template_kwargs=None, what: str = "training"
) -> List[Example]:
    """Token ids + assistant loss masks, cut to ``max_length`` tokens.

    A record without an anchor position is dropped; those that had one before the cut (their answer
    starts after ``data.max_length`` tokens) are counted and reported with the key to change. A record
    the chat template cannot mask soundly is skipped and counted; more than 5% of them is an error
    (the template or tokenizer is the problem)."""
    from deepspec.data.chat import ChatTemplateError, tokenize_conversation

    out, unstable, too_long = [], [], []
    for r in records:
        try:
            # uncut, to tell records cut before their answer from records without one
            ids, mask = tokenize_conversation(tokenizer, r["messages"], 1 << 62, template_kwargs)
        except ChatTemplateError:
            unstable.append(r.get("id", "?"))
            continue
        if _has_anchor(mask[:max_length]):
            out.append(Example(ids[:max_length], mask[:max_length]))
        elif _has_anchor(mask):
            too_long.append(r.get("id", "?"))
    if too_long:
        log.warning(
            "dropped %d of %d %s records: no answer token within data.max_length=%d tokens (e.g. %s); "
            "raise data.max_length to keep them",
            len(too_long),
            len(records),
            what,
            max_length,
            too_long[0],
        )
        if not out:
            raise ValueError(
                f"data.max_length={max_length} leaves no answer token in any {what} record: all "
                f"{len(too_long)} records with an answer start it later; raise data.max_length"
            )
    if unstable:
        log.warning(
            "skipped %d of %d records the chat template cannot mask (e.g. %s)",
            len(unstable),
            len(records),
            unstable[0],
        )
        if len(unstable) > 0.05 * len(records):
            raise ValueError(
                f"{len(unstable)} of {len(records)} records cannot be masked under the chat "
                f"template (first: {unstable[0]}); fix the template or the data"
            )
    return out


def train_examples(cfg, tokenizer, records: List[dict]) -> List[Example]:
    """The training sequences of a run, in data order (online training and collect use this one function)."""
    from deepspec.data.chat import template_kwargs_of

    if cfg.data.max_train_samples > 0:
        records = records[: cfg.data.max_train_samples]
    examples = tokenize_records(records, tokenizer, cfg.data.max_length, template_kwargs_of(cfg.data))
    if not examples:
        raise ValueError(
            "no training sequence has an answer token to anchor on (check the data and loss masks)"
        )
    return examples


def build_run(cfg, accelerator) -> RunSetup:
    # Nothing is written here: provenance waits until every start-up check passed (run_dir.RunDir.commit).
    out_dir = Path(cfg.train.output_dir)
    info = open_target(cfg, accelerator)
    path, tokenizer, target_config, trc = info.path, info.tokenizer, info.config, info.trust_remote_code
    dc = resolve_drafter_config(cfg.model, target_config, mask_token_id=tokenizer.mask_token_id)
    dc.num_anchors = cfg.data.num_anchors
    if cfg.export.after_training and dc.kind != "eagle3":  # the target's family is known now: before training
        check_format_carries(dc, str(cfg.export.format))
    shard = cfg.target.shard == "fsdp"
    if shard:  # each rank reads only its own shard of every weight (collective: all ranks load)
        from deepspec.target.shard_load import load_sharded_target

        target = load_sharded_target(path, dc.target_layer_ids, cfg.target.dtype, accelerator.device, trc)
    else:
        target = TargetModel.from_pretrained(
            path, dc.target_layer_ids, cfg.target.dtype, accelerator.device, trc
        )

    torch.manual_seed(cfg.train.seed)
    drafter = build_drafter(dc)
    drafter.init_weights(cfg.model.init_std, seed=cfg.train.seed)

    feature_source, heldout_records = None, None
    if cfg.data.source == "cache":  # features come from the offline cache, not from target forwards
        from deepspec.data.cache_loader import open_run_cache

        examples, eval_records, feature_source = open_run_cache(cfg, path, target, dc, accelerator)
        heldout_records = eval_records
    else:
        splits = load_records(cfg)
        examples = train_examples(cfg, tokenizer, splits["train"])
        heldout_records = splits["heldout"]
        eval_records = heldout_eval_records(heldout_records, cfg.eval)
    draft_ids = None
    if dc.pruned:  # the d tokens most often trained on (every rank counts the same examples)
        draft_ids = select_draft_ids(
            answer_token_counts(examples, dc.vocab_size),
            dc.draft_vocab_size,
            always_kept_ids(tokenizer, target_config, dc.mask_token_id),
        )
        drafter.set_draft_vocab(draft_ids)
        draft_ids = draft_ids.to(accelerator.device)
    # Sharded, the embedding and lm_head are all-gathered here for the drafter's frozen copies.
    drafter.load_target_head(target.embed_tokens.weight, target.lm_head.weight)
    drafter.to(accelerator.device)
    maybe_compile(drafter, cfg.train)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run_info = {
        "target": path,
        "drafter": dc.to_dict() | {"target_config": "<omitted>"},
        "train_sequences": len(examples),
        "eval_prompts": len(eval_records),
        "trainable_params": sum(p.numel() for p in drafter.trainable_parameters()),
        "target_shard": str(cfg.target.shard),
        "target_param_bytes_per_rank": local_param_bytes(target.model),
    }
    if accelerator.is_main_process:
        log.info(
            "target %s | drafter layers=%s ids=%s | %d train sequences",
            path,
            dc.num_layers,
            dc.target_layer_ids,
            len(examples),
        )
    run = RunSetup(
        cfg,
        out_dir,
        path,
        tokenizer,
        target,
        drafter,
        dc,
        examples,
        eval_records,
        pad,
        heldout_records,
        feature_source,
        draft_ids=draft_ids,
    )
    run.info = run_info
    return run


def maybe_compile(drafter, train_cfg) -> None:
    """``train.compile=true``: torch.compile the drafter's __call__ (the training forward) in place, so
    parameter names, ``draft()`` (evaluation stays eager) and exports are unchanged."""
    if getattr(train_cfg, "compile", False):
        drafter.compile(backend=train_cfg.compile_backend)


def run_eval(run: RunSetup, drafter: Drafter, out_dir: Path) -> dict:
    from deepspec.data.chat import end_of_turn_ids, prompt_ids, template_kwargs_of
    from deepspec.eval.runner import evaluate

    tkw = template_kwargs_of(run.cfg.data)
    prompts = [prompt_ids(run.tokenizer, r["messages"], tkw) for r in run.eval_records]
    # the same name evaluate.py gives this split, so plots and tables of both line up
    name = "tiny" if run.cfg.data.source == "tiny_chat" else "heldout"
    return evaluate(
        run.target,
        drafter,
        prompts,
        run.cfg.eval,
        end_of_turn_ids(run.tokenizer),
        out_dir=out_dir,
        dataset_name=name,
    )
