"""Serve an exported drafter in vLLM and compare it with deepspec's own decoding (docs/engine.md).

    python scripts/engine_check.py outputs/tiny-dspark/export/speculators
    python scripts/engine_check.py EXPORT_DIR --target TARGET_DIR --prompts prompts.jsonl \\
        [--num-prompts 8] [--max-new-tokens 32] [--temperatures 0 1] [--vllm-python PATH]

An export inside a training output dir (``<run>/export/<format>``) takes the target and the
held-out prompts from the run's config.yaml. Exit status: 0 when vLLM reproduces deepspec's greedy
outputs and its acceptance is within the 95 % interval, 1 when not, 2 when vLLM could not run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _here:
    sys.path[0] = os.path.dirname(_here)  # the repo root, so `deepspec` imports from a checkout


def _run_config(export_dir: Path):
    """The training run's config (typed, so derived values such as the tiny target's cache key are
    the ones training used), when the export lies inside a run."""
    for d in (export_dir.parent.parent, export_dir.parent):
        if (d / "config.yaml").is_file():
            from omegaconf import OmegaConf

            from deepspec.config import DeepSpecConfig

            return OmegaConf.merge(OmegaConf.structured(DeepSpecConfig), OmegaConf.load(d / "config.yaml"))
    return None


def _verifier_dir(export_dir: Path):
    """The local target folder a speculators export names as its verifier, if it exists here."""
    import json

    try:
        cfg = json.loads((export_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = ((cfg.get("speculators_config") or {}).get("verifier") or {}).get("name_or_path")
    return name if name and (Path(name) / "config.json").is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/engine_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("export_dir", help="exported drafter folder (speculators or native)")
    ap.add_argument("--target", help="target model folder (default: the run's target)")
    ap.add_argument("--prompts", help="prompts file (.jsonl/.json/.txt...; default: the run's held-out set)")
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reference", help="native drafter folder to compare against (default: the export's own weights)"
    )
    ap.add_argument(
        "--draft-sample-method", choices=["greedy", "probabilistic"], help="force vLLM's draft sampling"
    )
    ap.add_argument(
        "--vllm-python", help="Python with vLLM (default: $DEEPSPEC_VLLM_PYTHON or the cached CPU env)"
    )
    ap.add_argument(
        "--no-setup", action="store_true", help="do not create the vLLM environment if it is missing"
    )
    ap.add_argument(
        "--work-dir", help="logs and engine_check.json (default: <export>-engine-check next to it)"
    )
    args = ap.parse_args(argv)

    from deepspec.data.chat import end_of_turn_ids
    from deepspec.engine.check import run_engine_check
    from deepspec.engine.procs import EngineError, interrupt_on_sigterm
    from deepspec.eval.datasets import load_prompt_texts, select, tokenize_prompts
    from deepspec.target.loading import load_tokenizer

    export_dir = Path(args.export_dir)
    cfg = _run_config(export_dir)
    target = args.target or _verifier_dir(export_dir)
    if target is None:
        if cfg is None:
            print(f"error: {export_dir} is not inside a training run; pass --target", file=sys.stderr)
            return 2
        from deepspec.target.loading import resolve_target_path

        target = resolve_target_path(cfg)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            print(f"error: --prompts {args.prompts}: no such file", file=sys.stderr)
            return 2
        ns = SimpleNamespace(eval=SimpleNamespace(prompt_column=args.prompt_column, dataset_split="test"))
        texts = load_prompt_texts(args.prompts, ns)
    elif cfg is not None:
        texts = load_prompt_texts(str(cfg.eval.datasets[0]), cfg)
    else:
        print("error: pass --prompts (the export is not inside a training run)", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(str(target))
    prompts = tokenize_prompts(tokenizer, select(texts, args.num_prompts, args.seed))
    try:
        with interrupt_on_sigterm():
            report = run_engine_check(
                export_dir,
                target,
                prompts,
                end_of_turn_ids(tokenizer),
                temperatures=args.temperatures,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                vllm_python=args.vllm_python,
                work_dir=args.work_dir,
                reference=args.reference,
                draft_sample_method=args.draft_sample_method,
                setup=not args.no_setup,
            )
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"engine check {'PASSED' if report['ok'] else 'FAILED'}; report: {report['path']}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
