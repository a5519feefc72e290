"""The engine round trip: decode the same prompts through vLLM and through deepspec's evaluator.

For each temperature the exported drafter is served by vLLM (its offline engine in a subprocess of
the vLLM environment, :mod:`deepspec.engine.vllm_worker`) and decoded by deepspec's own chain
speculative decoding with the drafter as trained. Reported side by side: greedy outputs identical
(count), τ with a 95 % interval, acceptance per draft position. The check fails when, at T=0, any
output differs or more than one prompt in eight has other acceptance counts (rounds, accepted
drafts) than deepspec's, or, at any temperature, vLLM's τ is below deepspec's by more than the 95 %
interval of the difference (paired per prompt at T=0, where both sides decode the same tokens; two
independent samples at T>0).

deepspec's side is the reference: the drafter's weights from the export, read with the facts the
drafter was trained with (the native layer ids recorded in ``deepspec_export.json``, or a native
``reference`` folder). A config key the engine misreads therefore shows up as lost acceptance.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from deepspec import atomic
from deepspec.engine import stats
from deepspec.engine.procs import EngineError, run_to_end
from deepspec.engine.serving import serving_settings

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
RESULT_NAME = "engine_check.json"


def _cut(tokens: Sequence[int], stops: set, budget: int) -> List[int]:
    """Tokens up to and including the first stop id, at most ``budget`` of them (both sides alike)."""
    out: List[int] = []
    for t in list(tokens)[:budget]:
        out.append(int(t))
        if t in stops:
            break
    return out


def _prompt_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index  # deepspec.eval.runner's per-prompt seed


def reference_models(export_dir: Path, target_dir: str, reference: Optional[str] = None):
    """(TargetModel, drafter) for deepspec's side, in float32 on the CPU (or the GPU if present)."""
    from deepspec.exporting.native import load_native
    from deepspec.exporting.writer import load_export
    from deepspec.target.adapter import TargetModel

    if reference:
        drafter = load_native(reference, device="cpu", dtype=torch.float32)
    else:
        drafter = load_export(export_dir, dtype=torch.float32)
        sidecar = export_dir / "deepspec_export.json"
        if sidecar.is_file():
            trained = json.loads(sidecar.read_text()).get("target_layer_ids")
            if trained is not None:
                drafter.config.target_layer_ids = [int(i) for i in trained]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = TargetModel.from_pretrained(target_dir, drafter.config.target_layer_ids, "float32", device)
    return target, drafter.to(device).eval()


def deepspec_decode(target, drafter, prompts, stop_ids, temperature: float, max_new_tokens: int, seed: int):
    from deepspec.eval.spec_decode import speculative_generate

    gamma = drafter.config.block_size
    tokens, counts = [], []
    for i, p in enumerate(prompts):
        gen = torch.Generator(device=target.device).manual_seed(_prompt_seed(seed, i))
        r = speculative_generate(target, drafter, p, max_new_tokens, temperature, stop_ids, gen)
        tokens.append(_cut(r.tokens, set(stop_ids), max_new_tokens))
        counts.append(stats.from_rounds(r.rounds, gamma))
    return tokens, counts


def engine_decode(
    python: str,
    env: Dict[str, str],
    export_dir: Path,
    target_dir: str,
    prompts,
    stop_ids,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    spec: Dict,
    work: Path,
    timeout_s: float,
):
    """Run the worker once; returns (tokens, counts, worker timings)."""
    tag = f"T{temperature:g}-{spec.get('draft_sample_method', 'greedy')}"
    req = {
        "target": str(target_dir),
        "speculative_config": {**spec, "model": str(export_dir)},
        "prompts": [list(map(int, p)) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        "stop_ids": list(stop_ids),
        # Room for the longest prompt, the budget and one full draft block past it.
        "max_model_len": 32
        * math.ceil((max(map(len, prompts)) + max_new_tokens + 2 * spec["num_speculative_tokens"] + 8) / 32),
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / f"request-{tag}.json").write_text(json.dumps(req))
    result = work / f"result-{tag}.json"
    result.unlink(missing_ok=True)
    log = work / f"vllm-{tag}.log"
    log.unlink(missing_ok=True)
    run_to_end(
        [python, str(WORKER), str(work / f"request-{tag}.json"), str(result)],
        env,
        log,
        timeout_s,
        f"vLLM ({tag})",
    )
    out = json.loads(result.read_text())
    tokens = [_cut(r["tokens"], set(stop_ids), max_new_tokens) for r in out["prompts"]]
    counts = [stats.PromptCounts(r["drafts"], r["accepted"], r["per_pos"]) for r in out["prompts"]]
    return tokens, counts, {"load_s": out["load_s"], "decode_s": out["decode_s"], "log": str(log)}


def run_engine_check(
    export_dir,
    target_dir: str,
    prompts: List[List[int]],
    stop_ids: Sequence[int],
    temperatures: Sequence[float] = (0.0, 1.0),
    max_new_tokens: int = 32,
    seed: int = 0,
    vllm_python: Optional[str] = None,
    work_dir=None,
    reference: Optional[str] = None,
    draft_sample_method: Optional[str] = None,
    timeout_s: float = 1200.0,
    setup: bool = True,
    log=print,
) -> Dict:
    """The side-by-side report (``report["ok"]`` says whether the export serves as trained); also
    written to ``work_dir/engine_check.json``."""
    from deepspec.engine.vllm_env import engine_env, find_vllm_python

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise EngineError(
            f"{export_dir / 'config.json'} does not exist (expected an exported drafter folder)"
        )
    if not prompts:
        raise ValueError("the engine check needs at least one prompt")
    work = Path(work_dir) if work_dir else default_work_dir(export_dir)
    python = find_vllm_python(vllm_python, setup=setup, log=log)
    env = engine_env()
    target, drafter = reference_models(export_dir, target_dir, reference)
    gamma = drafter.config.block_size
    serving = serving_settings(json.loads((export_dir / "config.json").read_text()), gamma)
    report: Dict = {
        "export": str(export_dir),
        "target": str(target_dir),
        "engine": "vllm",
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "serving": serving,
        "runs": [],
    }
    ok = True
    for temp in temperatures:
        method = draft_sample_method or serving["draft_sample_method"]["greedy" if temp == 0 else "sampling"]
        spec = {**serving["speculative_config"], "draft_sample_method": method}
        t0 = time.monotonic()
        ref_tokens, ref_counts = deepspec_decode(
            target, drafter, prompts, stop_ids, temp, max_new_tokens, seed
        )
        t_ref = time.monotonic() - t0
        t0 = time.monotonic()
        eng_tokens, eng_counts, timing = engine_decode(
            python,
            env,
            export_dir,
            target_dir,
            prompts,
            stop_ids,
            temp,
            max_new_tokens,
            seed,
            spec,
            work,
            timeout_s,
        )
        ref, eng = stats.summary(ref_counts, gamma), stats.summary(eng_counts, gamma)
        if temp == 0:
            margin = stats.paired_margin(eng_counts, ref_counts)
        else:
            margin = stats.independent_margin(eng, ref)
        below = bool(eng["tau"] < ref["tau"] - margin)
        identical = sum(a == b for a, b in zip(ref_tokens, eng_tokens))
        differ = stats.acceptance_mismatches(eng_counts, ref_counts)
        run = {
            "temperature": temp,
            "draft_sample_method": method,
            "deepspec": ref,
            "vllm": eng,
            "margin95": margin,
            "identical_outputs": identical,
            "acceptance_below_interval": below,
            "prompts_with_other_acceptance": differ,
            "seconds": {"deepspec": t_ref, "vllm_total": time.monotonic() - t0, **timing},
        }
        # At T>0 the two sides draw different random numbers: only τ's interval applies.
        run["acceptance_differs"] = temp == 0 and differ > stats.allowed_mismatches(len(prompts))
        run["ok"] = not below and (temp != 0 or (identical == len(prompts) and not run["acceptance_differs"]))
        ok &= run["ok"]
        report["runs"].append(run)
        log(render_run(run, len(prompts)))
    report["ok"] = ok
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_json(work / RESULT_NAME, stats_safe(report))
    report["path"] = str(work / RESULT_NAME)
    readme = export_dir / "README.md"
    if readme.is_file():  # the model card carries the result
        from deepspec.exporting.card import with_engine_check

        atomic.write_text(readme, with_engine_check(readme.read_text(), stats_safe(report)))
    return report


def default_work_dir(export_dir: Path) -> Path:
    """``<run>/engine-check`` for an export inside a training run (a later export's card reads it
    from there), else ``<export>-engine-check`` beside the export."""
    run = export_dir.parent.parent
    if export_dir.parent.name == "export" and (run / "config.yaml").is_file():
        return run / "engine-check"
    return export_dir.parent / f"{export_dir.name}-engine-check"


def stats_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: stats_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [stats_safe(v) for v in obj]
    return obj


def _pos(p) -> str:
    return "/".join("-" if x is None else f"{x:.2f}" for x in p)


def render_run(run: Dict, n: int) -> str:
    d, v = run["deepspec"], run["vllm"]
    lines = [
        f"T={run['temperature']:g} (vLLM draft_sample_method={run['draft_sample_method']}): "
        + ("PASS" if run["ok"] else "FAIL"),
        f"  tau       deepspec {d['tau']:.3f} [{d['tau_ci95'][0]:.3f}, {d['tau_ci95'][1]:.3f}]   "
        f"vLLM {v['tau']:.3f} [{v['tau_ci95'][0]:.3f}, {v['tau_ci95'][1]:.3f}]   margin {run['margin95']:.3f}",
        f"  per slot  deepspec {_pos(d['per_position_acceptance'])}   vLLM {_pos(v['per_position_acceptance'])}",
    ]
    if run["temperature"] == 0:
        lines.append(f"  greedy outputs identical: {run['identical_outputs']}/{n}")
        if "prompts_with_other_acceptance" in run:
            lines.append(
                f"  acceptance per prompt identical: {n - run['prompts_with_other_acceptance']}/{n}"
                + (
                    "  (more prompts differ than numerical near-ties explain)"
                    if run.get("acceptance_differs")
                    else ""
                )
            )
    if run["acceptance_below_interval"]:
        lines.append("  vLLM's acceptance is below deepspec's beyond the 95 % interval")
    return "\n".join(lines)
