"""Everything a run needs before its first step: target, tokenizer, resolved drafter, data, output dir."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import OmegaConf

from deepspec.data.anchors import anchor_candidates
from deepspec.data.batching import Example
from deepspec.exporting.native import atomic_write_text
from deepspec.models import build_drafter
from deepspec.models.config import DSparkConfig, resolve_drafter_config
from deepspec.models.drafter import DSparkDrafter
from deepspec.target.adapter import TargetModel

log = logging.getLogger("deepspec")


@dataclass
class RunSetup:
    cfg: object
    out_dir: Path
    target_path: str
    tokenizer: object
    target: TargetModel
    drafter: DSparkDrafter
    drafter_config: DSparkConfig
    train_examples: List[Example]
    eval_records: List[dict]
    pad_id: int
    heldout_records: Optional[List[dict]] = None  # held-out chat records (checkpoint-time τ estimate)

    @property
    def lm_head(self):
        return self.target.lm_head


def resolve_target_path(cfg, accelerator=None) -> str:
    if cfg.target.name_or_path != "tiny":
        return cfg.target.name_or_path
    from deepspec.target.tiny import build_tiny_target

    # Only the main process builds; the others wait and then find it in the cache.
    if accelerator is not None:
        with accelerator.main_process_first():
            return str(build_tiny_target(cfg.target.tiny))
    return str(build_tiny_target(cfg.target.tiny))


def load_records(cfg) -> dict:
    """{"train": [...], "heldout": [...]} chat records ({"id", "messages"})."""
    if cfg.data.source == "tiny_chat":
        from deepspec.data.tiny_chat import tiny_chat_splits

        return tiny_chat_splits(cfg.target.tiny)
    raise ValueError(f"data.source={cfg.data.source!r} is unknown; expected 'tiny_chat'")


def tokenize_records(records: List[dict], tokenizer, max_length: int) -> List[Example]:
    """Token ids + assistant loss masks. A record whose turns do not tokenise prefix-stably (a
    BPE merge across the prompt/answer boundary) has no well-defined mask: it is skipped and
    counted, and more than 5% of them is an error (the template or tokenizer is the problem)."""
    from deepspec.data.chat import ChatTemplateError, tokenize_conversation

    out, unstable = [], []
    for r in records:
        try:
            ids, mask = tokenize_conversation(tokenizer, r["messages"], max_length)
        except ChatTemplateError:
            unstable.append(r.get("id", "?"))
            continue
        if anchor_candidates(torch.tensor(mask)).numel() > 0:
            out.append(Example(ids, mask))
    if unstable:
        log.warning("skipped %d of %d records whose chat turns do not tokenise prefix-stably (e.g. %s)",
                    len(unstable), len(records), unstable[0])
        if len(unstable) > 0.05 * len(records):
            raise ValueError(f"{len(unstable)} of {len(records)} records are not prefix-stable under the chat "
                             f"template (first: {unstable[0]}); fix the template or the data")
    return out


def build_run(cfg, accelerator) -> RunSetup:
    from transformers import AutoConfig, AutoTokenizer

    out_dir = Path(cfg.train.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    path = resolve_target_path(cfg, accelerator)
    trc = cfg.target.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trc)
    target_config = AutoConfig.from_pretrained(path, trust_remote_code=trc).to_dict()
    dc = resolve_drafter_config(cfg.model, target_config, mask_token_id=tokenizer.mask_token_id)
    dc.num_anchors = cfg.data.num_anchors
    target = TargetModel.from_pretrained(path, dc.target_layer_ids, cfg.target.dtype, accelerator.device, trc)

    torch.manual_seed(cfg.train.seed)
    drafter = build_drafter(dc)
    drafter.init_weights(cfg.model.init_std, seed=cfg.train.seed)
    drafter.load_target_head(target.embed_tokens.weight, target.lm_head.weight)
    drafter.to(accelerator.device)
    maybe_compile(drafter, cfg.train)

    splits = load_records(cfg)
    records = splits["train"]
    if cfg.data.max_train_samples > 0:
        records = records[: cfg.data.max_train_samples]
    examples = tokenize_records(records, tokenizer, cfg.data.max_length)
    if not examples:
        raise ValueError("no training sequence has an answer token to anchor on (check the data and loss masks)")
    eval_records = splits["heldout"][: cfg.eval.num_prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if accelerator.is_main_process:
        info = {"target": path, "drafter": dc.to_dict() | {"target_config": "<omitted>"},
                "train_sequences": len(examples), "eval_prompts": len(eval_records),
                "trainable_params": sum(p.numel() for p in drafter.trainable_parameters())}
        atomic_write_text(out_dir / "run_info.json", json.dumps(info, indent=2))
        log.info("target %s | drafter layers=%s ids=%s | %d train sequences", path, dc.num_hidden_layers,
                 dc.target_layer_ids, len(examples))
    return RunSetup(cfg, out_dir, path, tokenizer, target, drafter, dc, examples, eval_records, pad, splits["heldout"])


def maybe_compile(drafter, train_cfg) -> None:
    """``train.compile=true``: torch.compile the drafter's __call__ (the training forward) in place, so
    parameter names, ``draft()`` (evaluation stays eager) and exports are unchanged."""
    if getattr(train_cfg, "compile", False):
        drafter.compile(backend=train_cfg.compile_backend)


def run_eval(run: RunSetup, drafter: DSparkDrafter, out_dir: Path) -> dict:
    from deepspec.data.chat import end_of_turn_ids, prompt_ids
    from deepspec.eval.runner import evaluate

    prompts = [prompt_ids(run.tokenizer, r["messages"]) for r in run.eval_records]
    return evaluate(run.target, drafter, prompts, run.cfg.eval, end_of_turn_ids(run.tokenizer), out_dir=out_dir)
