"""The engine round trip in vLLM itself (slow): the vLLM environment made by our script, the Triton
CPU shim, the engine check of a drafter trained here (passes) and of planted faults (fail), and
deepspec/regenerate.py against vLLM's OpenAI server (kill and resume included).
The engine check runs at T=0 and at T=1 (draft_sample_method="probabilistic").

The first run makes the vLLM environment (.cache/deepspec/vllm-env, minutes; DEEPSPEC_VLLM_ENV
moves it, DEEPSPEC_VLLM_PYTHON uses an existing vLLM instead). Timings: docs/engine.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import MICRO_TARGET, micro_overrides, train_here

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# vLLM's CPU attention takes head sizes in multiples of 32 (not the 16 of the shared micro target);
# a longer-trained target and drafter so that the drafts depend on the target's features, which is
# what a misread layer id breaks.
ENGINE_TARGET = dict(MICRO_TARGET, head_dim=32, num_heads=2, num_kv_heads=1, train_steps=300)
DRAFTER_STEPS = 200
PROMPTS = 8
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """(run dir, target dir, prompts, stop ids) of a drafter trained on a vLLM-compatible micro target."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from deepspec.config import TinyTargetConfig
    from deepspec.data.chat import end_of_turn_ids
    from deepspec.eval.datasets import load_prompt_texts, select, tokenize_prompts
    from deepspec.target.tiny import build_tiny_target

    root = tmp_path_factory.mktemp("engine")
    # DEEPSPEC_TEST_ENGINE_CACHE keeps the engine target between sessions (its build is the slow part).
    cache = Path(os.environ.get("DEEPSPEC_TEST_ENGINE_CACHE") or root / "cache")
    base = [
        o
        for o in micro_overrides(cache, root / "run")
        if not o.startswith(("target.tiny.", "data.max_train_samples"))
    ]
    tiny = [f"target.tiny.{k}={v}" for k, v in ENGINE_TARGET.items()] + [f"target.tiny.cache_dir={cache}"]
    run = train_here(base + tiny + [f"train.max_steps={DRAFTER_STEPS}", "export.dtype=float32"])
    cfg = OmegaConf.load(run / "config.yaml")
    target = str(build_tiny_target(TinyTargetConfig(**ENGINE_TARGET, cache_dir=str(cache))))  # built: found
    tok = AutoTokenizer.from_pretrained(target)
    prompts = tokenize_prompts(tok, select(load_prompt_texts("tiny", cfg), PROMPTS, 0))
    return run, target, prompts, end_of_turn_ids(tok)


KERNEL = """
import torch, triton, triton.language as tl
from triton.runtime import driver
from vllm.triton_utils import HAS_TRITON

@triton.jit
def add(x, y, out, flag_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = tl.load(flag_ptr) >= 0
    # a block mask combined with a scalar flag, as vLLM's Gumbel sampler stores
    tl.store(out + i, tl.load(x + i, mask=i < n) + tl.load(y + i, mask=i < n), mask=(i < n) & valid)

x, y, out = torch.arange(10.0), torch.ones(10), torch.zeros(12)
try:
    add[(3,)](x, y, out, torch.zeros(1, dtype=torch.int32), 10, BLOCK=4)
    print("result", out.tolist())
except RuntimeError as e:
    print("error", e)
print("driver", type(driver.active).__name__, "has_triton", HAS_TRITON)
"""


def test_triton_cpu_shim_runs_kernels_in_the_interpreter(vllm_python, tmp_path):
    (tmp_path / "kernel.py").write_text(KERNEL)  # @triton.jit reads its source from a file
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    cmd = [vllm_python, "kernel.py"]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    interp = subprocess.run(
        cmd, env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, cwd=tmp_path
    )
    want = [float(i + 1) for i in range(10)] + [0.0, 0.0]
    assert f"result {want}" in interp.stdout, interp.stdout + interp.stderr[-2000:]
    assert "driver CPUInterpreterDriver has_triton True" in interp.stdout
    # Without the interpreter there is no CPU compiler: the error says what to set.
    assert "set TRITON_INTERPRET=1" in plain.stdout, plain.stdout + plain.stderr[-2000:]


LIBDEVICE = """
import json, math, sys
import torch, triton, triton.language as tl
import triton.language.extra.libdevice as tldevice
from deepspec_vllm_shims.triton_cpu.libdevice_np import BINARY, UNARY

# Reference values from Python's math module (float64), independent of the NumPy bodies under test.
HALF_AWAY = lambda x: math.copysign(math.floor(abs(x) + 0.5), x)
REF = dict(
    log1p=math.log1p, expm1=math.expm1, exp=math.exp, exp2=lambda x: 2.0**x, log=math.log, log2=math.log2,
    log10=math.log10, sqrt=math.sqrt, rsqrt=lambda x: 1 / math.sqrt(x), abs=abs, floor=math.floor,
    ceil=math.ceil, trunc=math.trunc, rint=round, round=HALF_AWAY, sin=math.sin, cos=math.cos, tan=math.tan,
    asin=math.asin, acos=math.acos, atan=math.atan, sinh=math.sinh, cosh=math.cosh, tanh=math.tanh,
    erf=math.erf, isnan=math.isnan, isinf=math.isinf, isfinited=math.isfinite,
    signbit=lambda x: math.copysign(1.0, x) < 0, pow=math.pow, atan2=math.atan2, fmod=math.fmod,
    hypot=math.hypot,
)
INPUTS = [0.125, 0.3, 0.5, 0.7, 0.9, 0.05, 0.6, 0.2]
ROUNDING = [0.5, 1.5, 2.5, -2.5, -0.7, 0.2, 3.7, -1.5]
SPECIAL = [0.0, float("nan"), float("inf"), float("-inf"), -0.0, 1.0, -2.0, float("nan")]
SECOND = [2.0, 0.5, 3.0, 0.25, 1.5, 0.1, 2.5, 0.9]
src = ["import triton, triton.language as tl", "import triton.language.extra.libdevice as tldevice"]
for name in list(UNARY) + list(BINARY):
    call = f"tldevice.{name}(tl.load(x + i), tl.load(y + i))" if name in BINARY else f"tldevice.{name}(tl.load(x + i))"
    src += ["@triton.jit", f"def k_{name}(x, y, out):", "    i = tl.arange(0, 8)",
            f"    tl.store(out + i, ({call}).to(tl.float32))"]
open("kernels.py", "w").write("\\n".join(src) + "\\n")  # @triton.jit reads its source from a file
sys.path.insert(0, ".")
import kernels

errors = {}
for name in list(UNARY) + list(BINARY):
    xs = SPECIAL if UNARY.get(name, (0, False))[1] else ROUNDING if name in ("floor", "ceil", "trunc", "rint", "round", "abs") else INPUTS
    x, y, out = torch.tensor(xs), torch.tensor(SECOND), torch.zeros(8)
    getattr(kernels, f"k_{name}")[(1,)](x, y, out)
    args = [x.double().tolist()] + ([y.double().tolist()] if name in BINARY else [])
    want = [float(REF[name](*a)) for a in zip(*args)]
    errors[name] = max(abs(g - w) / max(1.0, abs(w)) for g, w in zip(out.tolist(), want))
try:
    getattr(kernels, "k_log1p")[(1,)](torch.zeros(8, dtype=torch.float16), torch.zeros(8), torch.zeros(8))
    half = "ran"
except Exception as e:
    half = str(e)
print(json.dumps({"errors": errors, "half": half}))
"""


def test_triton_cpu_shim_runs_libdevice_functions_in_the_interpreter(vllm_python, tmp_path):
    """libdevice stubs (vLLM's T>0 rejection sampler calls log1p) get NumPy bodies in the interpreter;
    each one agrees with Python's math module to float32 precision."""
    (tmp_path / "check.py").write_text(LIBDEVICE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [vllm_python, "check.py"],
        env={**env, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "log1p" in out["errors"] and "isnan" in out["errors"] and "pow" in out["errors"]
    bad = {k: v for k, v in out["errors"].items() if not v <= 2e-6}
    assert not bad, bad
    # Like the CUDA library, no half-precision versions: a clear refusal, not a wrong number.
    assert "libdevice.log1p takes fp32 or fp64" in out["half"], out["half"]


def _planted(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    for k, fn in changes.items():
        cfg[k] = fn(cfg[k])
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_engine_check_passes_and_planted_faults_fail(vllm_python, engine_run, tmp_path):
    from deepspec.engine.check import run_engine_check

    run, target, prompts, stops = engine_run
    export = run / "export" / "speculators"
    kw = dict(max_new_tokens=NEW_TOKENS, vllm_python=vllm_python, log=print)
    t = time.monotonic()
    # T=1 runs in Triton's interpreter thanks to the libdevice shim (vLLM's rejection sampler).
    good = run_engine_check(
        export, target, prompts, stops, temperatures=(0.0, 1.0), work_dir=tmp_path / "good", **kw
    )
    print(f"engine check T=0 and T=1: {time.monotonic() - t:.0f} s")
    t0, t1 = good["runs"]
    assert good["ok"], json.dumps(good["runs"], indent=1)
    assert t0["identical_outputs"] == len(prompts)
    # Served as trained, vLLM proposes deepspec's drafts: every prompt's acceptance counts agree.
    assert t0["prompts_with_other_acceptance"] == 0 and not t0["acceptance_differs"]
    assert abs(t0["vllm"]["tau"] - t0["deepspec"]["tau"]) <= t0["margin95"]
    assert t0["deepspec"]["tau"] > 1.3, "the test drafter must accept drafts for the faults to show"
    assert t1["draft_sample_method"] == "probabilistic" and t1["temperature"] == 1.0
    assert abs(t1["vllm"]["tau"] - t1["deepspec"]["tau"]) <= t1["margin95"]
    # Not collapsed to ~1.1 as with vLLM's default greedy drafting at T>0 (docs/engine.md).
    assert t1["vllm"]["tau"] > 1.5 and t1["vllm"]["rounds"] > 0
    report = json.loads((tmp_path / "good" / "engine_check.json").read_text())
    assert report["ok"] and report["serving"]["speculative_config"]["method"] == "dspark"
    # The model card carries the result for both temperatures.
    card = (export / "README.md").read_text()
    assert card.count("### Engine check") == 1 and "result: **pass**" in card
    assert (
        f"| 0.0 | greedy | {t0['deepspec']['tau']:.3f} [" in card
        and f"| {len(prompts)}/{len(prompts)} | pass |" in card
    )
    assert f"| 1.0 | probabilistic | {t1['deepspec']['tau']:.3f} [" in card

    shifted = _planted(
        export, tmp_path / "shifted", aux_hidden_state_layer_ids=lambda ids: [i + 1 for i in ids]
    )
    bad = run_engine_check(
        shifted, target, prompts, stops, temperatures=(0.0,), work_dir=tmp_path / "s", **kw
    )
    assert not bad["ok"] and bad["runs"][0]["acceptance_below_interval"], json.dumps(bad["runs"], indent=1)
    assert bad["runs"][0]["acceptance_differs"]  # 7 of 8 prompts' counts moved (docs/engine.md)

    flipped = _planted(export, tmp_path / "flipped", sample_from_anchor=lambda v: not v)
    bad = run_engine_check(
        flipped, target, prompts, stops, temperatures=(0.0,), work_dir=tmp_path / "f", **kw
    )
    assert not bad["ok"] and bad["runs"][0]["acceptance_below_interval"], json.dumps(bad["runs"], indent=1)


def test_regenerate_against_vllm_server_with_kill_and_resume(vllm_python, engine_run, tmp_path):
    from deepspec.engine.procs import port_in_use
    from deepspec.engine.server import vllm_server

    _run, target, _prompts, _stops = engine_run
    n = 16
    with open(tmp_path / "prompts.jsonl", "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"def f{i}(x):"}]}) + "\n"
            )
    with vllm_server(
        target,
        tmp_path / "server.log",
        served_name="tiny-served",
        vllm_python=vllm_python,
        extra_args=["--max-model-len", "256"],
    ) as srv:
        port, pid = srv.port, srv.pid

        def args(out):
            return [
                sys.executable, str(ROOT / "deepspec" / "regenerate.py"),
                f"regen.input={tmp_path / 'prompts.jsonl'}", f"regen.output={out}",
                "regen.backend=openai", f"regen.urls=[{srv.url}]", "regen.model=tiny-served",
                "regen.concurrency=1", "regen.max_new_tokens=16", "regen.max_retries=2",
                "data.enable_thinking=false",
            ]  # fmt: skip

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        ref = subprocess.run(
            args(tmp_path / "ref.jsonl"), env=env, capture_output=True, text=True, timeout=600
        )
        assert ref.returncode == 0, ref.stderr[-2000:]
        out = tmp_path / "killed.jsonl"
        proc = subprocess.Popen(args(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = out.read_text().count("\n")
        assert 4 <= done < n, "the kill should land mid-run"
        res = subprocess.run(args(out) + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == n and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert not port_in_use(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
