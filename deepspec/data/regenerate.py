"""Regenerate the answers of a prompt set with the target itself (docs/method.md, Data: the drafter learns the
target's own distribution, so the assistant turns must be the target's answers).

Two backends (deepspec/data/regen_backends.py) share this driver:
  * ``local``: transformers on this machine, batched over chunks of consecutive prompts;
  * ``openai``: any OpenAI-compatible chat-completions server (vLLM, SGLang), several URLs,
    bounded concurrency per URL, retries with exponential backoff.

Guarantees:
  * the output jsonl keeps the input order and ids; a sample that fails goes to the errors file
    (its original record plus ``error``), so the errors file is itself a valid input for a retry;
  * sampling is seeded per sample and turn (``sample_seed(seed, id, turn)``): a sample's answer
    does not depend on which other samples ran with it, on the number of URLs or on concurrency
    (for the local backend, chunks are fixed groups of ``batch_size`` consecutive prompts, so even
    padding is the same on a rerun);
  * every line is flushed when written; ``resume`` drops a torn last line, skips the ids already in
    the output or errors file, and continues: a run killed at any point and resumed writes exactly
    what an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from deepspec import atomic
from deepspec.training import faults

log = logging.getLogger("deepspec")

META_SUFFIX = ".meta.json"


class RegenerateError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


class EndpointUnreachable(RegenerateError):
    """Every retry of a request failed at the connection level: the servers are down or wrong."""


class SampleError(Exception):
    """One sample cannot be answered (too long, rejected by the server): it goes to the errors file."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0


def effective_sampling(regen_cfg, data_cfg) -> Sampling:
    """The recipe's sampling settings for the chosen mode (thinking when data.enable_thinking is true)."""
    src = regen_cfg.thinking_sampling if getattr(data_cfg, "enable_thinking", None) else regen_cfg.sampling
    return Sampling(float(src.temperature), float(src.top_p), int(src.top_k), float(src.min_p))


def sample_seed(seed: int, sample_id: str, turn: int) -> int:
    """A 31-bit seed of (run seed, sample id, turn): the same wherever and with whatever the sample runs."""
    digest = hashlib.sha256(f"{seed}\x00{sample_id}\x00{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class Job:
    index: int
    id: str
    record: dict  # the input record (id, messages), written to the errors file on failure
    system: List[dict]  # system messages before the first user turn, as in the data (none injected)
    users: List[str]  # user turns to answer, in order


@dataclass
class Outcome:
    index: int
    id: str
    record: Optional[dict] = None  # output record
    error: Optional[str] = None


def make_jobs(records: Sequence[dict], max_turns: int) -> List[Job]:
    jobs = []
    for i, r in enumerate(records):
        msgs = r["messages"]
        first_user = next(k for k, m in enumerate(msgs) if m["role"] == "user")
        system = [dict(m) for m in msgs[:first_user] if m["role"] == "system"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if max_turns > 0:
            users = users[:max_turns]
        rec = {k: v for k, v in r.items() if k != "where"}
        jobs.append(Job(i, str(r["id"]), rec, system, users))
    return jobs


def split_reasoning(text: str, thinking: bool) -> Dict[str, str]:
    """An assistant message from generated text; in thinking mode the think block becomes reasoning_content."""
    if thinking and "</think>" in text:
        head, _, tail = text.partition("</think>")
        reasoning = head.split("<think>", 1)[-1].strip("\n")
        return {"role": "assistant", "content": tail.lstrip("\n"), "reasoning_content": reasoning}
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------- output files


def _read_complete_lines(path: Path) -> List[dict]:
    """Records of a jsonl written by this module, after cutting a torn (partial) last line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning(
            "%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut
        )
        with open(path, "r+b") as f:
            f.truncate(cut)
    out = []
    for lineno, line in enumerate(data[:cut].splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RegenerateError(
                    f"{path}:{lineno}: not JSON ({e.msg}); this file was not written by regenerate"
                ) from None
    return out


class OrderedSink:
    """Appends outcomes to the output / errors files, one flushed line each."""

    def __init__(self, out_path: Path, err_path: Path) -> None:
        self.out_path, self.err_path = out_path, err_path
        self.out = open(out_path, "a", encoding="utf-8")
        self.err = open(err_path, "a", encoding="utf-8")
        self.written = 0
        self.errors = 0

    def write(self, o: Outcome) -> None:
        f = self.out if o.error is None else self.err
        line = json.dumps(o.record, ensure_ascii=False) + "\n"
        n = self.written + self.errors + 1
        if faults.armed("kill_in_record", n):  # a torn line, as a kill in the middle of a write leaves
            f.write(line[: len(line) // 2])
            f.flush()
            faults.maybe_kill("kill_in_record", n)
        f.write(line)
        f.flush()  # a SIGKILL loses nothing already written
        faults.maybe_kill("kill_after_record", n)
        if o.error is None:
            self.written += 1
        else:
            self.errors += 1

    def close(self) -> None:
        for f in (self.out, self.err):
            f.flush()
            os.fsync(f.fileno())
            f.close()


def error_record(job: Job, error: str, turn: int) -> dict:
    return {**job.record, "error": error, "failed_turn": turn}


def output_record(job: Job, messages: List[dict], finish: List[str], seeds: List[int]) -> dict:
    return {"id": job.id, "messages": messages, "meta": {"finish_reasons": finish, "seeds": seeds}}


# ----------------------------------------------------------------------------- driver


def _run_local(
    backend, jobs: List[Job], done: Set[str], sink: OrderedSink, batch_size: int, progress
) -> None:
    for c in range(0, len(jobs), batch_size):
        chunk = jobs[c : c + batch_size]
        todo = [j for j in chunk if j.id not in done]
        if not todo:
            continue
        # The whole chunk runs even if part of it is done: same batch, same padding, same numbers.
        for o in backend.run_chunk(chunk):
            if o.id not in done:
                sink.write(o)
                progress(1)


def _run_openai(backend, jobs: List[Job], done: Set[str], sink: OrderedSink, progress) -> None:
    todo = [j for j in jobs if j.id not in done]
    window = backend.workers * 4
    with ThreadPoolExecutor(max_workers=backend.workers, thread_name_prefix="regen") as pool:
        futures = {}
        nxt = 0
        try:
            for pos in range(len(todo)):
                while nxt < len(todo) and nxt < pos + window:
                    futures[nxt] = pool.submit(backend.run_job, todo[nxt])
                    nxt += 1
                outcome = futures.pop(pos).result()  # in input order
                sink.write(outcome)
                progress(1)
        except BaseException:
            backend.stop.set()  # the other requests give up at their next attempt
            for f in futures.values():
                f.cancel()
            raise


def _meta(
    cfg, input_path: str, sampling: Sampling, model_name: str, template_kwargs: Mapping, n: int
) -> dict:
    rc = cfg.regen
    meta = {
        "input": str(input_path),
        "backend": rc.backend,
        "model": model_name,
        "sampling": asdict(sampling),
        "seed": int(rc.seed),
        "max_new_tokens": int(rc.max_new_tokens),
        "max_turns": int(rc.max_turns),
        "template_kwargs": dict(template_kwargs),
        "num_prompts": n,
    }
    if rc.backend == "local":
        meta["batch_size"] = int(rc.batch_size)  # chunking sets padding, hence the exact numbers
        meta["dtype"] = str(cfg.target.dtype)
    return meta


def output_paths(regen_cfg) -> Tuple[Path, Path, Path]:
    if not regen_cfg.output:
        raise RegenerateError("regen.output is not set (the jsonl to write)")
    out = Path(regen_cfg.output)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    err = Path(regen_cfg.errors) if regen_cfg.errors else out.with_name(stem + ".errors.jsonl")
    return out, err, out.with_name(stem + META_SUFFIX)


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def regenerate(cfg, progress_bar: bool = True) -> Dict[str, int]:
    """Run (or resume) a regeneration described by ``cfg.regen`` / ``cfg.data`` / ``cfg.target``."""
    from tqdm.auto import tqdm

    from deepspec.config import validate
    from deepspec.data.chat import template_kwargs_of
    from deepspec.data.prompts import LoadStats, load_conversations

    validate(cfg)  # every number and choice, before any prompt is read or a model loads
    from deepspec.target.sharding import refuse_target_shard

    refuse_target_shard(cfg, "regeneration (deepspec/regenerate.py)")
    rc = cfg.regen
    input_path = rc.input or cfg.data.path
    if not input_path:
        raise RegenerateError(
            "regen.input is not set (prompts: a jsonl/json/parquet file, folder, glob or hub dataset)"
        )
    out, err, meta_path = output_paths(rc)
    stats = LoadStats()
    records = load_conversations(
        input_path,
        messages_key=cfg.data.messages_key,
        id_key=cfg.data.id_key,
        on_error=cfg.data.on_error,
        need_assistant=False,
        hub_config=cfg.data.hub_config,
        hub_split=cfg.data.hub_split,
        max_records=rc.max_samples,
        stats=stats,
    )
    jobs = make_jobs(records, rc.max_turns)
    sampling = effective_sampling(rc, cfg.data)
    tkw = template_kwargs_of(cfg.data)
    thinking = bool(cfg.data.enable_thinking)
    model_name = rc.model or cfg.target.name_or_path
    meta = _meta(cfg, input_path, sampling, model_name, tkw, len(jobs))

    exists = out.exists() or err.exists()
    if exists and not rc.resume:
        if not rc.overwrite:
            raise RegenerateError(
                f"{out} already exists: pass --resume (regen.resume=true) to continue it, "
                "or regen.overwrite=true to start again"
            )
        for p in (out, err, meta_path):
            p.unlink(missing_ok=True)
        exists = False
    done: Set[str] = set()
    if exists:
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise RegenerateError(
                    f"cannot resume {out}: settings differ from the interrupted run in "
                    + ", ".join(f"{k} ({old.get(k)!r} -> {meta[k]!r})" for k in diff)
                )
        done = {str(r["id"]) for r in _read_complete_lines(out)} | {
            str(r["id"]) for r in _read_complete_lines(err)
        }
        unknown = done - {j.id for j in jobs}
        if unknown:
            raise RegenerateError(
                f"cannot resume {out}: it holds ids not in the input (e.g. {sorted(unknown)[0]!r})"
            )
        log.info("resuming %s: %d of %d samples already done", out, len(done), len(jobs))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(meta_path, {**meta, "complete": False}, sort_keys=True)

    sink = OrderedSink(out, err)
    bar = tqdm(total=len(jobs), initial=len(done), desc="regenerate", disable=not progress_bar)
    try:
        if rc.backend == "local":
            backend = _local_backend(cfg, sampling, tkw, thinking)
            _run_local(backend, jobs, done, sink, max(1, rc.batch_size), bar.update)
        else:
            from deepspec.data.regen_backends import OpenAIBackend

            backend = OpenAIBackend(
                rc.urls,
                model_name,
                sampling,
                rc.max_new_tokens,
                rc.seed,
                tkw,
                thinking,
                rc.concurrency,
                rc.timeout_s,
                rc.max_retries,
                rc.backoff_s,
                rc.api_key,
            )
            try:
                _run_openai(backend, jobs, done, sink, bar.update)
            except EndpointUnreachable as e:
                raise EndpointUnreachable(
                    f"{e}. {len(done) + sink.written + sink.errors} of {len(jobs)} samples are safely in {out} / "
                    f"{err}; rerun with --resume once the server is up"
                ) from None
    finally:
        sink.close()
        bar.close()
    counts = {
        "prompts": len(jobs),
        "written": len(done) + sink.written + sink.errors,
        "new_outputs": sink.written,
        "new_errors": sink.errors,
        "skipped_input_records": stats.num_skipped,
    }
    atomic.write_json(meta_path, {**meta, "complete": True}, sort_keys=True)
    log.info("regenerate: %s", counts)
    return counts


def _local_backend(cfg, sampling: Sampling, tkw: Mapping, thinking: bool):
    import torch

    from deepspec.data.regen_backends import LocalBackend
    from deepspec.target.loading import load_causal_lm, load_tokenizer, resolve_target_path

    path = resolve_target_path(cfg)
    trc = bool(cfg.target.trust_remote_code)
    tok = load_tokenizer(path, trc)
    model = load_causal_lm(path, cfg.target.dtype, trc)  # safetensors only: never a pickled .bin
    model = model.to(_device(cfg.regen.device)).eval()
    torch.manual_seed(cfg.regen.seed)  # nothing should draw from it; per-row generators do the sampling
    return LocalBackend(model, tok, sampling, cfg.regen.max_new_tokens, cfg.regen.seed, tkw, thinking)


def __getattr__(name):  # the backends and their helpers, importable from here too
    if name in ("LocalBackend", "OpenAIBackend", "filter_logits", "chat_url"):
        from deepspec.data import regen_backends

        return getattr(regen_backends, name)
    raise AttributeError(name)
