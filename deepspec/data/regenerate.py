"""Regenerate the answers of a prompt set with the target itself (SPEC §3: the drafter learns the
target's own distribution, so the assistant turns must be the target's answers).

Two backends share one driver:
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
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

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
    digest = hashlib.sha256(f"{seed}\x00{sample_id}\x00{turn}".encode("utf-8")).digest()
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
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - cut)
        with open(path, "r+b") as f:
            f.truncate(cut)
    out = []
    for lineno, line in enumerate(data[:cut].splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RegenerateError(f"{path}:{lineno}: not JSON ({e.msg}); this file was not written by regenerate") from None
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
        f.write(json.dumps(o.record, ensure_ascii=False) + "\n")
        f.flush()  # a SIGKILL loses nothing already written
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


# ----------------------------------------------------------------------------- sampling (local backend)


def filter_logits(logits, s: Sampling):
    """Temperature, top-k, top-p and min-p applied to [B, V] logits; returns probabilities."""
    import torch

    logits = logits.float() / max(s.temperature, 1e-6)
    if s.top_k > 0 and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = (sp.cumsum(-1) - sp) > s.top_p  # keep the smallest set whose mass reaches top_p
        probs = probs.scatter(1, si, sp.masked_fill(drop, 0.0))
    if s.min_p > 0.0:
        probs = probs.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def _row_sampler(sampling: Sampling, generators):
    """A logits processor that draws each row's token with that row's own generator (then greedy picks it)."""
    import torch
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if sampling.temperature <= 0:
                choice = scores.float().argmax(-1)
            else:
                probs = filter_logits(scores, sampling)
                choice = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(generators)])
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, choice[:, None], 0.0)

    return RowSampler()


class LocalBackend:
    def __init__(self, model, tokenizer, sampling: Sampling, max_new_tokens: int, seed: int,
                 template_kwargs: Mapping, thinking: bool) -> None:
        from deepspec.data.chat import end_of_turn_ids

        self.model, self.tok = model, tokenizer
        self.sampling, self.max_new_tokens, self.seed = sampling, max_new_tokens, seed
        self.template_kwargs, self.thinking = dict(template_kwargs), thinking
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.stop_ids = sorted(set(end_of_turn_ids(tokenizer)) | set(gen_eos))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    def _generate(self, prompts: List[List[int]], seeds: List[int]) -> List[Tuple[str, str]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        gc = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids,
                              pad_token_id=self.pad_id, bos_token_id=None)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gc,
                                      logits_processor=LogitsProcessorList([_row_sampler(self.sampling, gens)]))
        results = []
        stops = set(self.stop_ids)
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            toks = row if cut is None else row[:cut]
            results.append((self.tok.decode(toks, skip_special_tokens=True), "length" if cut is None else "stop"))
        return results

    def run_chunk(self, jobs: List[Job]) -> List[Outcome]:
        """All turns of a chunk of jobs, turn by turn, batched across the chunk."""
        from deepspec.data.chat import ChatTemplateError, generation_prompt_ids

        convs = {j.index: list(j.system) for j in jobs}
        finish: Dict[int, List[str]] = {j.index: [] for j in jobs}
        seeds: Dict[int, List[int]] = {j.index: [] for j in jobs}
        failed: Dict[int, Tuple[str, int]] = {}
        for turn in range(max(len(j.users) for j in jobs)):
            active, prompts = [], []
            for j in jobs:
                if j.index in failed or turn >= len(j.users):
                    continue
                convs[j.index].append({"role": "user", "content": j.users[turn]})
                try:
                    p = generation_prompt_ids(self.tok, convs[j.index], self.template_kwargs)
                except (ChatTemplateError, ValueError) as e:  # jinja raise_exception and friends
                    failed[j.index] = (f"chat template: {e}", turn)
                    continue
                if len(p) + self.max_new_tokens > self.max_positions:
                    failed[j.index] = (f"prompt has {len(p)} tokens; with max_new_tokens={self.max_new_tokens} it "
                                       f"exceeds the target's {self.max_positions} positions", turn)
                    continue
                active.append(j)
                prompts.append(p)
            if not active:
                continue
            turn_seeds = [sample_seed(self.seed, j.id, turn) for j in active]
            for j, s, (text, why) in zip(active, turn_seeds, self._generate(prompts, turn_seeds)):
                convs[j.index].append(split_reasoning(text, self.thinking))
                finish[j.index].append(why)
                seeds[j.index].append(s)
        out = []
        for j in jobs:
            if j.index in failed:
                msg, turn = failed[j.index]
                out.append(Outcome(j.index, j.id, error_record(j, msg, turn), msg))
            else:
                out.append(Outcome(j.index, j.id, output_record(j, convs[j.index], finish[j.index], seeds[j.index])))
        return out


# ----------------------------------------------------------------------------- OpenAI-compatible backend


def chat_url(url: str) -> str:
    u = url.rstrip("/")
    if u.endswith("/chat/completions"):
        return u
    if not u.endswith("/v1"):
        u += "/v1"
    return u + "/chat/completions"


class OpenAIBackend:
    """Chat completions over HTTP with the standard library (no client package needed)."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, urls: Sequence[str], model: str, sampling: Sampling, max_new_tokens: int, seed: int,
                 template_kwargs: Mapping, thinking: bool, concurrency: int = 8, timeout_s: float = 600.0,
                 max_retries: int = 5, backoff_s: float = 1.0, api_key: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not urls:
            raise RegenerateError("regen.urls is empty: give at least one server URL")
        if concurrency < 1:
            raise RegenerateError(f"regen.concurrency={concurrency}: must be >= 1")
        self.urls = [chat_url(u) for u in urls]
        self.model, self.sampling, self.max_new_tokens, self.seed = model, sampling, max_new_tokens, seed
        self.template_kwargs, self.thinking = dict(template_kwargs), thinking
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.sleep = sleep
        self._slots = [threading.Semaphore(concurrency) for _ in self.urls]
        self.stop = threading.Event()

    @property
    def workers(self) -> int:
        return self.concurrency * len(self.urls)

    def _body(self, messages: List[dict], seed: int) -> dict:
        s = self.sampling
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p if s.temperature > 0 else 1.0,
            "seed": seed,
            "n": 1,
            "stream": False,
        }
        if s.top_k > 0 and s.temperature > 0:
            body["top_k"] = s.top_k  # vLLM / SGLang extension
        if s.min_p > 0 and s.temperature > 0:
            body["min_p"] = s.min_p
        if self.template_kwargs:
            body["chat_template_kwargs"] = self.template_kwargs  # e.g. {"enable_thinking": false}
        return body

    def _post(self, url: str, body: dict) -> dict:
        import urllib.error
        import urllib.request

        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def request(self, index: int, messages: List[dict], seed: int) -> Tuple[Dict[str, str], str]:
        """(assistant message, finish reason) with retries; raises SampleError or EndpointUnreachable."""
        import urllib.error

        body = self._body(messages, seed)
        conn_errors: List[str] = []
        last = ""
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise EndpointUnreachable("stopped")
            k = (index + attempt) % len(self.urls)  # a retry goes to the next server
            url = self.urls[k]
            try:
                with self._slots[k]:
                    data = self._post(url, body)
                return self._parse(data, url)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300] if hasattr(e, "read") else ""
                last = f"{url}: HTTP {e.code} {detail}".strip()
                if e.code not in self.RETRY_STATUS:
                    raise SampleError(last) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{url}: {type(reason).__name__}: {reason}"
                conn_errors.append(last)
            except ValueError as e:  # not JSON
                last = f"{url}: bad response: {e}"
            if attempt < self.max_retries:
                delay = min(60.0, self.backoff_s * (2 ** attempt)) * (1.0 + 0.25 * random.random())
                self.sleep(delay)
        if len(conn_errors) == self.max_retries + 1:
            raise EndpointUnreachable(
                f"no server answered after {self.max_retries + 1} attempts over {len(self.urls)} URL(s) "
                f"({', '.join(self.urls)}); last error: {last}"
            )
        raise SampleError(f"failed after {self.max_retries + 1} attempts; last error: {last}")

    def _parse(self, data: dict, url: str) -> Tuple[Dict[str, str], str]:
        try:
            choice = data["choices"][0]
            msg = choice["message"]
            content = msg.get("content") or ""
            reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise SampleError(f"{url}: response has no choices[0].message ({str(data)[:200]})") from None
        finish = choice.get("finish_reason") or "stop"
        if reasoning:  # a server-side reasoning parser already split it
            return {"role": "assistant", "content": content, "reasoning_content": reasoning}, finish
        return split_reasoning(content, self.thinking), finish

    def run_job(self, job: Job) -> Outcome:
        conv = list(job.system)
        finish, seeds = [], []
        for turn, user in enumerate(job.users):
            conv.append({"role": "user", "content": user})
            s = sample_seed(self.seed, job.id, turn)
            try:
                msg, why = self.request(job.index, conv, s)
            except SampleError as e:
                return Outcome(job.index, job.id, error_record(job, str(e), turn), str(e))
            conv.append(msg)
            finish.append(why)
            seeds.append(s)
        return Outcome(job.index, job.id, output_record(job, conv, finish, seeds))


# ----------------------------------------------------------------------------- driver


def _run_local(backend: LocalBackend, jobs: List[Job], done: Set[str], sink: OrderedSink, batch_size: int,
               progress) -> None:
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


def _run_openai(backend: OpenAIBackend, jobs: List[Job], done: Set[str], sink: OrderedSink, progress) -> None:
    todo = [j for j in jobs if j.id not in done]
    window = backend.workers * 4
    with ThreadPoolExecutor(max_workers=backend.workers, thread_name_prefix="regen") as pool:
        futures = {}
        nxt = 0
        try:
            for pos, job in enumerate(todo):
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


def _meta(cfg, input_path: str, sampling: Sampling, model_name: str, template_kwargs: Mapping, n: int) -> dict:
    rc = cfg.regen
    meta = {"input": str(input_path), "backend": rc.backend, "model": model_name, "sampling": asdict(sampling),
            "seed": int(rc.seed), "max_new_tokens": int(rc.max_new_tokens), "max_turns": int(rc.max_turns),
            "template_kwargs": dict(template_kwargs), "num_prompts": n}
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

    from deepspec.data.chat import template_kwargs_of
    from deepspec.data.prompts import LoadStats, load_conversations

    rc = cfg.regen
    if rc.backend not in ("local", "openai"):
        raise RegenerateError(f"regen.backend={rc.backend!r}: expected 'local' or 'openai'")
    input_path = rc.input or cfg.data.path
    if not input_path:
        raise RegenerateError("regen.input is not set (prompts: a jsonl/json/parquet file, folder, glob or hub dataset)")
    out, err, meta_path = output_paths(rc)
    stats = LoadStats()
    records = load_conversations(input_path, messages_key=cfg.data.messages_key, id_key=cfg.data.id_key,
                                 on_error=cfg.data.on_error, need_assistant=False, hub_config=cfg.data.hub_config,
                                 hub_split=cfg.data.hub_split, max_records=rc.max_samples, stats=stats)
    jobs = make_jobs(records, rc.max_turns)
    sampling = effective_sampling(rc, cfg.data)
    tkw = template_kwargs_of(cfg.data)
    thinking = bool(cfg.data.enable_thinking)
    model_name = rc.model or cfg.target.name_or_path
    meta = _meta(cfg, input_path, sampling, model_name, tkw, len(jobs))

    exists = out.exists() or err.exists()
    if exists and not rc.resume:
        if not rc.overwrite:
            raise RegenerateError(f"{out} already exists: pass --resume (regen.resume=true) to continue it, "
                                  "or regen.overwrite=true to start again")
        for p in (out, err, meta_path):
            p.unlink(missing_ok=True)
        exists = False
    done: Set[str] = set()
    if exists:
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise RegenerateError(f"cannot resume {out}: settings differ from the interrupted run in "
                                      + ", ".join(f"{k} ({old.get(k)!r} -> {meta[k]!r})" for k in diff))
        done = {str(r["id"]) for r in _read_complete_lines(out)} | {str(r["id"]) for r in _read_complete_lines(err)}
        unknown = done - {j.id for j in jobs}
        if unknown:
            raise RegenerateError(f"cannot resume {out}: it holds ids not in the input (e.g. {sorted(unknown)[0]!r})")
        log.info("resuming %s: %d of %d samples already done", out, len(done), len(jobs))
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_json(meta_path, {**meta, "complete": False})

    sink = OrderedSink(out, err)
    bar = tqdm(total=len(jobs), initial=len(done), desc="regenerate", disable=not progress_bar)
    try:
        if rc.backend == "local":
            backend = _local_backend(cfg, sampling, tkw, thinking)
            _run_local(backend, jobs, done, sink, max(1, rc.batch_size), bar.update)
        else:
            backend = OpenAIBackend(rc.urls, model_name, sampling, rc.max_new_tokens, rc.seed, tkw, thinking,
                                    rc.concurrency, rc.timeout_s, rc.max_retries, rc.backoff_s, rc.api_key)
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
    counts = {"prompts": len(jobs), "written": len(done) + sink.written + sink.errors, "new_outputs": sink.written,
              "new_errors": sink.errors, "skipped_input_records": stats.num_skipped}
    _atomic_json(meta_path, {**meta, "complete": True})
    log.info("regenerate: %s", counts)
    return counts


def _local_backend(cfg, sampling: Sampling, tkw: Mapping, thinking: bool) -> LocalBackend:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepspec.target.adapter import DTYPES
    from deepspec.training.setup import resolve_target_path

    path = resolve_target_path(cfg)
    trc = cfg.target.trust_remote_code
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trc)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.target.dtype], trust_remote_code=trc)
    model = model.to(_device(cfg.regen.device)).eval()
    torch.manual_seed(cfg.regen.seed)  # nothing should draw from it; per-row generators do the sampling
    return LocalBackend(model, tok, sampling, cfg.regen.max_new_tokens, cfg.regen.seed, tkw, thinking)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
