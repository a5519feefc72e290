"""The two regeneration backends: transformers on this machine, and OpenAI-compatible servers.

Both answer a Job (all its user turns, in order) with per-(sample, turn) seeds; the driver in
deepspec/data/regenerate.py orders, writes and resumes.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from deepspec.data.regenerate import (
    EndpointUnreachable,
    Job,
    Outcome,
    RegenerateError,
    SampleError,
    Sampling,
    error_record,
    output_record,
    sample_seed,
    split_reasoning,
)

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
                choice = torch.stack(
                    [torch.multinomial(probs[r], 1, generator=g)[0] for r, g in enumerate(generators)]
                )
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(1, choice[:, None], 0.0)

    return RowSampler()


class LocalBackend:
    def __init__(
        self,
        model,
        tokenizer,
        sampling: Sampling,
        max_new_tokens: int,
        seed: int,
        template_kwargs: Mapping,
        thinking: bool,
    ) -> None:
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
            ids[r, width - len(p) :] = torch.tensor(p)
            attn[r, width - len(p) :] = 1
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        gc = GenerationConfig(
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            bos_token_id=None,
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=attn.to(device),
                generation_config=gc,
                logits_processor=LogitsProcessorList([_row_sampler(self.sampling, gens)]),
            )
        results = []
        stops = set(self.stop_ids)
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), None)
            toks = row if cut is None else row[:cut]
            results.append(
                (self.tok.decode(toks, skip_special_tokens=True), "length" if cut is None else "stop")
            )
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
                    failed[j.index] = (
                        f"prompt has {len(p)} tokens; with max_new_tokens={self.max_new_tokens} it "
                        f"exceeds the target's {self.max_positions} positions",
                        turn,
                    )
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
                out.append(
                    Outcome(j.index, j.id, output_record(j, convs[j.index], finish[j.index], seeds[j.index]))
                )
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

    def __init__(
        self,
        urls: Sequence[str],
        model: str,
        sampling: Sampling,
        max_new_tokens: int,
        seed: int,
        template_kwargs: Mapping,
        thinking: bool,
        concurrency: int = 8,
        timeout_s: float = 600.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        api_key: Optional[str] = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
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
        req = urllib.request.Request(
            url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
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
                delay = min(60.0, self.backoff_s * (2**attempt)) * (1.0 + 0.25 * random.random())
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
