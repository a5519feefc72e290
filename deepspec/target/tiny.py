"""Build (or reuse) the embedded target: a small LM (Qwen3, or Gemma 4 with ``family=gemma4``) trained
here, on CPU, on a local text corpus (this Python's standard library by default).

The result is an ordinary HF folder (model + tokenizer + chat template + generation config), so
everything downstream loads it exactly like a downloaded target. It is cached under a key made of
every config field that changes the result and the corpus (paths and contents), and written into
a temporary folder that is renamed into place only once complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from deepspec import atomic
from deepspec.config import TinyTargetConfig
from deepspec.data.tiny_chat import chat_pairs, check_pairs
from deepspec.target.corpus import HELDOUT, TRAIN, CorpusFile, corpus_digest, corpus_root, load_corpus
from deepspec.target.tiny_eval import heldout_chat_loss, heldout_text_loss, sample_reply
from deepspec.target.tiny_eval import windows as _windows
from deepspec.target.tiny_presets import resolve_preset
from deepspec.training.optim import warmup_cosine

BUILD_VERSION = 2  # bump when this recipe changes, so old cached targets are not reused
ENDOFTEXT, MASK, IM_START, IM_END = "<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, MASK, IM_START, IM_END]  # ids 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
REPORT_FILE, COMPLETE_MARKER = "tiny_target.json", ".complete"
CHAT_SHARE = 0.5  # share of each training batch that is chat-formatted pairs (the rest raw files)
MAX_POSITIONS = 2048
# Fields that cannot change the trained weights or the report; the corpus enters the key by content.
# The preset is resolved into the fields it sets before the key is made, so its name adds nothing
# (and leaving it out keeps the keys of targets built before presets existed).
_NOT_IN_KEY = {"cache_dir", "num_threads", "corpus_dir", "preset"}


def use_bf16_autocast() -> bool:
    """True where the CPU has native bf16 (AVX512-BF16 / AMX): there bf16 autocast halves a step.

    Elsewhere bf16 is emulated and slower than fp32, so training stays fp32. The choice changes
    the weights, so it is part of the cache key.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    native = re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _as_config(cfg) -> TinyTargetConfig:
    """A TinyTargetConfig (from itself or a Hydra DictConfig of the schema) with its preset applied."""
    if not isinstance(cfg, TinyTargetConfig):
        from omegaconf import OmegaConf

        cfg = TinyTargetConfig(**OmegaConf.to_container(cfg, resolve=True))
    return resolve_preset(cfg)


def cache_key(cfg: TinyTargetConfig, files: Sequence[CorpusFile], bf16: bool) -> str:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_KEY}
    blob = json.dumps(
        {"v": BUILD_VERSION, "cfg": fields, "corpus": corpus_digest(files), "bf16": bf16}, sort_keys=True
    )
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def _scrub(text: str) -> str:
    """Break up special-token literals in corpus text, so MASK & co never occur in training data."""
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, tok[:2] + " " + tok[2:])
    return text


def _scrub_pair(pair: Dict) -> List[Dict]:
    return [{"role": m["role"], "content": _scrub(m["content"])} for m in pair["messages"]]


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE wrapped as a PreTrainedTokenizerFast with the ChatML-style template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed {len(alphabet) + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        mask_token=MASK,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
    )


def _render_chat(messages: List[Dict]) -> str:
    # Same text as CHAT_TEMPLATE (a test checks it); Jinja per pair would dominate data prep.
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def _stream(tokenizer, texts: Sequence[str]):
    """Token stream of the texts, each followed by <|endoftext|>, and the offset each starts at."""
    eot = [tokenizer.pad_token_id]
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts))
    docs = [torch.tensor(enc.ids + eot, dtype=torch.long) for enc in encoded]
    lengths = torch.tensor([0] + [len(d) for d in docs[:-1]], dtype=torch.long)
    return torch.cat(docs) if docs else torch.zeros(0, dtype=torch.long), lengths.cumsum(0)[: len(docs)]


TINY_FAMILIES = ("qwen3", "gemma4")  # deepspec.config.TinyFamily


def _family_config(cfg: TinyTargetConfig, vocab_size: int, tokenizer):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(MAX_POSITIONS, cfg.seq_len),
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.family == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM, Qwen3Config(**common)
    if cfg.family == "gemma4":
        from transformers import Gemma4ForCausalLM, Gemma4TextConfig

        # Gemma 4's own layer pattern (sliding layers, last layer full attention with its global head
        # dim and proportional RoPE) and its final logit soft-capping, at the tiny size; no per-layer
        # input embeddings, which would double the parameter count here.
        return Gemma4ForCausalLM, Gemma4TextConfig(
            **common,
            global_head_dim=2 * cfg.head_dim,
            layer_types=[
                "full_attention" if (i + 1) % 6 == 0 or i == cfg.num_layers - 1 else "sliding_attention"
                for i in range(cfg.num_layers)
            ],
            sliding_window=128,
            hidden_size_per_layer_input=0,
            final_logit_softcapping=30.0,
        )
    raise ValueError(f"target.tiny.family={cfg.family!r} is unknown; expected one of {TINY_FAMILIES}")


def _build_model(cfg: TinyTargetConfig, tokenizer):
    from transformers import GenerationConfig

    torch.manual_seed(cfg.seed)
    cls, config = _family_config(cfg, len(tokenizer), tokenizer)
    model = cls(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


def _train(model, cfg: TinyTargetConfig, raw, chat, bf16: bool) -> Dict:
    raw_ids, _ = raw
    chat_ids, chat_starts = chat
    length = cfg.seq_len + 1
    if raw_ids.numel() < length:
        raise ValueError(f"training corpus has {raw_ids.numel()} tokens, fewer than seq_len + 1 = {length}")
    n_chat = round(cfg.batch_size * CHAT_SHARE) if chat_ids.numel() >= length else 0
    n_raw = cfg.batch_size - n_chat
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: List[float] = []
    model.train()
    bar = tqdm(range(cfg.train_steps), desc="tiny target", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.train_steps, cfg.warmup_steps, min_ratio=0.1, peak=cfg.lr)
        # Raw rows start anywhere; chat rows start at a conversation, as prompts do at inference.
        raw_off = torch.randint(0, max(1, raw_ids.numel() - length), (n_raw,), generator=gen)
        rows = [_windows(raw_ids, raw_off, length)]
        if n_chat:
            pick = torch.randint(0, chat_starts.numel(), (n_chat,), generator=gen)
            rows.append(_windows(chat_ids, chat_starts[pick], length))
        batch = torch.cat(rows)
        # Autocast is entered per step: it caches bf16 copies of the weights until it exits.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.train_steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    tail = losses[-max(1, len(losses) // 10) :]
    return {"train_loss_first": losses[0], "train_loss_last": sum(tail) / len(tail)}


def _run_build(
    cfg: TinyTargetConfig,
    files: List[CorpusFile],
    pairs: Dict[str, List[Dict]],
    out_dir: Path,
    bf16: bool,
    log,
) -> Dict:
    t0 = time.time()
    train_files = [f for f in files if f.split == TRAIN]
    heldout_files = [f for f in files if f.split == HELDOUT]
    if not train_files or not heldout_files:
        raise ValueError(
            f"corpus split has {len(train_files)} train and {len(heldout_files)} held-out files; "
            "need both (raise max_files or adjust heldout_fraction)"
        )
    # Corpus order is by path; shuffle once by seed so raw windows mix packages evenly.
    order = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    train_texts = [_scrub(train_files[i].text) for i in order]
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_pairs, heldout_pairs = pairs[TRAIN], pairs[HELDOUT]
    pair_order = torch.randperm(len(train_pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    raw = _stream(tokenizer, train_texts)
    chat = _stream(tokenizer, [_render_chat(_scrub_pair(train_pairs[i])) for i in pair_order])
    heldout_raw, _ = _stream(tokenizer, [_scrub(f.text) for f in heldout_files])
    t_prep = time.time() - t0
    log(
        f"tiny target: {len(train_files)} train / {len(heldout_files)} held-out files, "
        f"{raw[0].numel():,} raw + {chat[0].numel():,} chat tokens, {len(train_pairs)} train pairs "
        f"(prep {t_prep:.1f}s)"
    )

    model = _build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    precision = "bf16 autocast" if bf16 else "fp32"
    log(
        f"tiny target: {type(model).__name__} with {n_params / 1e6:.2f}M parameters, {cfg.train_steps} steps ({precision})"
    )
    t1 = time.time()
    train_stats = _train(model, cfg, raw, chat, bf16)
    t_train = time.time() - t1
    model.eval()
    text_loss = heldout_text_loss(model, cfg, heldout_raw)
    chat_loss = heldout_chat_loss(model, cfg, tokenizer, [_scrub_pair(p) for p in heldout_pairs])
    report = {
        "heldout_text_loss": text_loss,
        "heldout_text_ppl": math.exp(text_loss),
        "heldout_chat_loss": chat_loss,
        "heldout_chat_ppl": math.exp(chat_loss),
        **train_stats,
        "uniform_loss": math.log(len(tokenizer)),
        "train_precision": precision,
        "train_time_s": t_train,
        "prep_time_s": t_prep,
        "num_parameters": n_params,
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_pairs": len(train_pairs),
        "heldout_pairs": len(heldout_pairs),
        "train_tokens_seen": cfg.train_steps * cfg.batch_size * cfg.seq_len,
        "special_token_ids": {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS},
        "sample": sample_reply(model, tokenizer, _scrub_pair(heldout_pairs[0])) if heldout_pairs else None,
    }
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    report["build_time_s"] = time.time() - t0
    return report


def build_tiny_target(cfg: TinyTargetConfig, log: Callable[[str], None] = print) -> Path:
    """Folder of the tiny target for ``cfg``: reused if already built, else trained now (minutes)."""
    cfg = _as_config(cfg)
    threads = torch.get_num_threads()
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _build_or_reuse(cfg, log)
    finally:
        torch.set_num_threads(threads)  # the thread count is process-wide: leave it as found


def _check(cfg: TinyTargetConfig) -> None:
    from deepspec.config import validate

    validate(cfg, prefix="target.tiny")  # the same ranges as at start-up, for direct callers
    if cfg.family not in TINY_FAMILIES:
        raise ValueError(f"target.tiny.family={cfg.family!r} is unknown; expected one of {TINY_FAMILIES}")


def _build_or_reuse(cfg: TinyTargetConfig, log) -> Path:
    _check(cfg)
    files = load_corpus(cfg.corpus_dir, cfg.corpus_glob, cfg.heldout_fraction, cfg.max_files)
    cache = Path(cfg.cache_dir).expanduser().resolve()
    bf16 = use_bf16_autocast()
    final = cache / f"tiny-target-{cache_key(cfg, files, bf16)}"
    if (final / COMPLETE_MARKER).is_file():
        log(f"tiny target: reusing {final}")
        return final
    with atomic.build_lock(
        cache / f".build-lock-{final.name}", lambda: log(f"tiny target: waiting for {final.name}")
    ):
        if (final / COMPLETE_MARKER).is_file():  # another process built it while this one waited
            log(f"tiny target: reusing {final}")
            return final
        return _build(cfg, files, final, bf16, log)


def _build(cfg: TinyTargetConfig, files, final: Path, bf16: bool, log) -> Path:
    # Cut the chat data first: a corpus that gives none stops here, not after the whole build.
    pairs = {split: chat_pairs(files, split) for split in (TRAIN, HELDOUT)}
    check_pairs(cfg, {k: len(v) for k, v in pairs.items()})
    log(f"tiny target: building {final.name} from {corpus_root(cfg.corpus_dir)} ({len(files)} files)")
    if final.exists() and not (final / COMPLETE_MARKER).is_file():
        shutil.rmtree(final)  # left by an older, interrupted writer: never valid
    try:
        with atomic.staged_dir(final, replace=False) as tmp:
            report = _run_build(cfg, files, pairs, tmp, bf16, log)
            payload = {"config": dataclasses.asdict(cfg), "key": final.name, "build_version": BUILD_VERSION}
            payload.update(report)
            atomic.write_json(tmp / REPORT_FILE, payload)
            atomic.write_text(tmp / COMPLETE_MARKER, "ok\n")
    except OSError:
        if not (final / COMPLETE_MARKER).is_file():
            raise  # not a concurrent build that finished first
        log(f"tiny target: another build finished first; using {final}")
        report = json.loads((final / REPORT_FILE).read_text())
    log(
        f"tiny target: held-out text loss {report['heldout_text_loss']:.3f} "
        f"(ppl {report['heldout_text_ppl']:.2f}), chat loss {report['heldout_chat_loss']:.3f} "
        f"(ppl {report['heldout_chat_ppl']:.2f}), train {report['train_time_s']:.0f}s -> {final}"
    )
    return final


def load_report(folder) -> Dict:
    return json.loads((Path(folder) / REPORT_FILE).read_text())
