"""Regeneration: sampling settings, per-sample seeds, order/ids/errors, OpenAI-compatible servers
(stand-in on 127.0.0.1), retries, unreachable endpoints, and kill/resume identity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launchers import free_port
from omegaconf import OmegaConf
from openai_standin import StandIn

from deepspec.config import DeepSpecConfig
from deepspec.data.regenerate import (
    EndpointUnreachable,
    RegenerateError,
    Sampling,
    effective_sampling,
    filter_logits,
    regenerate,
    sample_seed,
    split_reasoning,
)

ROOT = Path(__file__).resolve().parents[1]


def write_prompts(path: Path, n: int, bad=(), schema="sharegpt") -> Path:
    with open(path, "w") as f:
        for i in range(n):
            text = f"question {i}" + (" BAD" if i in bad else "")
            if schema == "sharegpt":
                rec = {
                    "id": f"q{i}",
                    "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "old"}],
                }
            else:
                rec = {"id": f"q{i}", "messages": [{"role": "user", "content": text}]}
            f.write(json.dumps(rec) + "\n")
    return path


def make_cfg(**overrides):
    cfg = OmegaConf.structured(DeepSpecConfig)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def lines(path: Path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture()
def server():
    s = StandIn()
    yield s
    s.close()


# ----------------------------------------------------------------------------- units


def test_recipe_sampling_and_thinking_switch():
    cfg = make_cfg()
    assert effective_sampling(cfg.regen, cfg.data) == Sampling(0.7, 0.8, 20, 0.0)  # Qwen3 non-thinking
    cfg.data.enable_thinking = True
    assert effective_sampling(cfg.regen, cfg.data) == Sampling(0.6, 0.95, 20, 0.0)  # Qwen3 thinking


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0)
    seeds = {sample_seed(0, f"id{i}", t) for i in range(200) for t in range(2)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(1, "a", 0) != sample_seed(0, "a", 0)


def test_filter_logits_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = filter_logits(logits, Sampling(1.0, 1.0, 2, 0.0))
    assert torch.allclose(p, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    p = filter_logits(logits, Sampling(1.0, 0.8, 0, 0.0))  # 0.5 + 0.2 < 0.8: the third token is needed
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    p = filter_logits(logits, Sampling(1.0, 1.0, 0, 0.35))  # keep p >= 0.35 * 0.5
    assert torch.allclose(p, torch.tensor([[0.5, 0.2, 0, 0, 0]]) / 0.7)
    p = filter_logits(logits, Sampling(0.5, 1.0, 0, 0.0))  # T = 0.5 squares the probabilities
    q = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]) ** 2
    assert torch.allclose(p, q / q.sum(), atol=1e-6)


def test_split_reasoning():
    assert split_reasoning("<think>\nhmm\n</think>\n\nok", True) == {
        "role": "assistant",
        "content": "ok",
        "reasoning_content": "hmm",
    }
    assert split_reasoning("<think>x</think>ok", False) == {
        "role": "assistant",
        "content": "<think>x</think>ok",
    }


# ----------------------------------------------------------------------------- OpenAI-compatible backend


def openai_cfg(tmp_path, urls, n=12, **kw):
    inp = write_prompts(tmp_path / "prompts.jsonl", n, bad=kw.pop("bad", (3,)))
    base = {
        "regen.input": str(inp),
        "regen.output": str(tmp_path / kw.pop("out", "out.jsonl")),
        "regen.backend": "openai",
        "regen.urls": urls,
        "regen.model": "tiny-served",
        "regen.backoff_s": 0.01,
        "regen.max_retries": 3,
        "regen.concurrency": 2,
        "data.enable_thinking": False,
    }
    base.update(kw)
    return make_cfg(**base)


def test_openai_order_ids_errors_and_settings(tmp_path, server):
    second = StandIn(transient={"question 5": 2})  # two 503s, then it answers
    try:
        cfg = openai_cfg(tmp_path, [server.url, second.url], n=12)
        counts = regenerate(cfg, progress_bar=False)
    finally:
        second.close()
    out, err = lines(tmp_path / "out.jsonl"), lines(tmp_path / "out.errors.jsonl")
    assert [r["id"] for r in out] == [f"q{i}" for i in range(12) if i != 3]  # input order, ids kept
    assert [r["id"] for r in err] == ["q3"] and "HTTP 400" in err[0]["error"]
    assert err[0]["messages"][0]["content"] == "question 3 BAD"  # the errors file is a valid input
    assert counts["new_outputs"] == 11 and counts["new_errors"] == 1
    r0 = out[0]
    # The data's old answer is replaced by the served one; no system turn is injected.
    assert [m["role"] for m in r0["messages"]] == ["user", "assistant"]
    assert r0["messages"][1]["content"].startswith("answer ")
    bodies = server.requests + second.requests
    b = bodies[0]
    assert (b["temperature"], b["top_p"], b["top_k"], b["model"]) == (0.7, 0.8, 20, "tiny-served")
    assert b["chat_template_kwargs"] == {"enable_thinking": False}
    assert len({x["seed"] for x in bodies if "question 5" not in x["messages"][-1]["content"]}) == 11
    assert server.requests and second.requests  # both servers were used
    meta = json.loads((tmp_path / "out.meta.json").read_text())
    assert meta["complete"] and meta["sampling"]["top_p"] == 0.8


def test_openai_output_does_not_depend_on_servers_or_concurrency(tmp_path, server):
    a = openai_cfg(tmp_path, [server.url], n=10, out="a.jsonl", **{"regen.concurrency": 1})
    regenerate(a, progress_bar=False)
    other = StandIn()
    try:
        b = openai_cfg(tmp_path, [server.url, other.url], n=10, out="b.jsonl", **{"regen.concurrency": 3})
        regenerate(b, progress_bar=False)
    finally:
        other.close()
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


def test_bounded_concurrency(tmp_path):
    slow = StandIn(delay=0.05)
    try:
        regenerate(openai_cfg(tmp_path, [slow.url], n=12, **{"regen.concurrency": 3}), progress_bar=False)
    finally:
        slow.close()
    assert 1 < slow.max_in_flight <= 3


def test_unreachable_endpoint_keeps_what_was_written(tmp_path):
    cfg = openai_cfg(tmp_path, [f"http://127.0.0.1:{free_port()}/v1"], n=4, bad=())
    with pytest.raises(EndpointUnreachable, match=r"after 4 attempts.*127\.0\.0\.1.*--resume"):
        regenerate(cfg, progress_bar=False)
    assert lines(tmp_path / "out.jsonl") == [] and lines(tmp_path / "out.errors.jsonl") == []

    # A server that goes down mid-run: what was written stays, and resume completes the run exactly.
    flaky = StandIn(down_after=5)
    cfg = openai_cfg(tmp_path, [flaky.url], n=12, bad=(), out="run.jsonl", **{"regen.concurrency": 1})
    with pytest.raises(EndpointUnreachable, match="5 of 12 samples are safely"):
        regenerate(cfg, progress_bar=False)
    part = lines(tmp_path / "run.jsonl")
    assert [r["id"] for r in part] == [f"q{i}" for i in range(5)]
    flaky.down, flaky.down_after = False, None
    cfg.regen.resume = True
    regenerate(cfg, progress_bar=False)
    ref = openai_cfg(tmp_path, [flaky.url], n=12, bad=(), out="ref.jsonl")
    regenerate(ref, progress_bar=False)
    flaky.close()
    assert (tmp_path / "run.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_refuses_to_clobber_or_resume_with_other_settings(tmp_path, server):
    cfg = openai_cfg(tmp_path, [server.url], n=3, bad=())
    regenerate(cfg, progress_bar=False)
    with pytest.raises(RegenerateError, match="--resume"):
        regenerate(cfg, progress_bar=False)
    cfg.regen.resume = True
    cfg.regen.sampling.temperature = 1.0
    with pytest.raises(RegenerateError, match=r"sampling"):
        regenerate(cfg, progress_bar=False)


def test_malformed_prompt_line(tmp_path, server):
    inp = tmp_path / "p.jsonl"
    inp.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "hi"}]}\n{"id": "b", "messages": [\n'
        '{"id": "c", "messages": [{"role": "user", "content": "yo"}]}\n'
    )
    cfg = openai_cfg(tmp_path, [server.url], n=1)
    cfg.regen.input = str(inp)
    with pytest.raises(Exception, match=r"p\.jsonl:2: malformed JSON"):
        regenerate(cfg, progress_bar=False)
    cfg.data.on_error = "skip"
    counts = regenerate(cfg, progress_bar=False)
    assert counts["skipped_input_records"] == 1 and [r["id"] for r in lines(tmp_path / "out.jsonl")] == [
        "a",
        "c",
    ]


def test_kill_and_resume_is_identical(tmp_path):
    """SIGKILL the command-line run mid-way, resume it: byte-identical to an uninterrupted run."""
    slow = StandIn(delay=0.04)
    try:
        n = 40
        ref = openai_cfg(tmp_path, [slow.url], n=n, out="ref.jsonl", bad=(7,), **{"regen.concurrency": 1})
        regenerate(ref, progress_bar=False)
        out = tmp_path / "killed.jsonl"
        args = [
            sys.executable,
            str(ROOT / "deepspec" / "regenerate.py"),
            f"regen.input={tmp_path / 'prompts.jsonl'}",
            f"regen.output={out}",
            "regen.backend=openai",
            f"regen.urls=[{slow.url}]",
            "regen.model=tiny-served",
            "regen.concurrency=1",
            "regen.backoff_s=0.01",
            "regen.max_retries=3",
            "data.enable_thinking=false",
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Generous: on a busy 2-core CI box the child's imports alone can take a minute.
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 10):
            assert proc.poll() is None, f"regenerate exited early: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert out.exists(), "no output after 300 s; the run never got going"
        done = out.read_text().count("\n")
        assert 10 <= done < n - 1, "the kill should land mid-run"
        res = subprocess.run(
            args + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
    finally:
        slow.close()
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    assert (tmp_path / "killed.errors.jsonl").read_bytes() == (tmp_path / "ref.errors.jsonl").read_bytes()


# ----------------------------------------------------------------------------- local backend


def local_cfg(tmp_path, micro_target, out="local.jsonl", n=6, **kw):
    _, tcfg, _ = micro_target
    inp = write_prompts(tmp_path / "lp.jsonl", n, bad=(), schema="openai")
    base = {
        "regen.input": str(inp),
        "regen.output": str(tmp_path / out),
        "regen.backend": "local",
        "regen.max_new_tokens": 12,
        "regen.batch_size": 4,
        "regen.device": "cpu",
    }
    base.update(
        {f"target.tiny.{k}": v for k, v in OmegaConf.to_container(OmegaConf.structured(tcfg)).items()}
    )
    base.update(kw)
    return make_cfg(**base)


def test_local_backend_seeded_and_resumable(tmp_path, micro_target):
    ref = local_cfg(tmp_path, micro_target, "ref.jsonl")
    regenerate(ref, progress_bar=False)
    recs = lines(tmp_path / "ref.jsonl")
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(6)]
    assert all(r["messages"][-1]["role"] == "assistant" for r in recs)
    assert {f for r in recs for f in r["meta"]["finish_reasons"]} <= {"stop", "length"}

    # Same settings again: identical; a crash that left one record of the second chunk and a torn
    # line resumes to identical output (the chunk is rerun whole, same padding, same seeds).
    again = local_cfg(tmp_path, micro_target, "again.jsonl")
    regenerate(again, progress_bar=False)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    text = (tmp_path / "ref.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "again.jsonl").write_text("".join(text[:5]) + text[5][:17])
    again.regen.resume = True
    regenerate(again, progress_bar=False)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "ref.jsonl").read_bytes()

    # A different seed gives different answers (sampling is on: T = 0.7).
    other = local_cfg(tmp_path, micro_target, "other.jsonl", **{"regen.seed": 1})
    regenerate(other, progress_bar=False)
    assert lines(tmp_path / "other.jsonl") != recs
