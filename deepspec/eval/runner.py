"""Offline evaluation (docs/method.md, Evaluation protocol): chain drafting, full block, at each configured temperature.

Every prompt is decoded by drafter + target and by the plain target (same seed) so the report
carries both acceptance statistics and a wall-clock speed ratio. ``eval.batch_size`` prompts are
decoded together (both by drafter + target and by the baseline); each prompt has its own random
stream, so its tokens do not depend on the batch size; the recorded rounds then feed
calibration, the threshold sweep and the scheduler simulation (:mod:`deepspec.eval.analysis`).
Results go to ``eval.json`` (plots next to it).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from deepspec import atomic
from deepspec.eval import metrics
from deepspec.eval.report import finite_or_none, format_table, write_rounds
from deepspec.eval.spec_decode import generate


def check_compatible(target, drafter) -> None:
    """Fail before any decoding if the drafter cannot read this target's features or tokens."""
    c = drafter.config
    if c.vocab_size != target.vocab_size:
        raise ValueError(
            f"drafter vocab_size={c.vocab_size} but the target's lm_head has {target.vocab_size} rows; "
            "the drafter was built for a different target/tokenizer"
        )
    if c.target_hidden_size != target.hidden_size:
        raise ValueError(
            f"drafter expects target hidden size {c.target_hidden_size} but the target has {target.hidden_size}"
        )
    if c.num_target_layers != target.num_layers:
        raise ValueError(
            f"drafter was built for a {c.num_target_layers}-layer target; this target has {target.num_layers} layers"
        )
    bad = [i for i in c.target_layer_ids if not -1 <= i < target.num_layers]
    if bad:
        raise ValueError(
            f"drafter target_layer_ids={c.target_layer_ids}: {bad} out of range for a "
            f"{target.num_layers}-layer target (valid: -1..{target.num_layers - 1})"
        )
    if list(target.layer_ids) != list(c.target_layer_ids):
        raise ValueError(
            f"target adapter captures layers {list(target.layer_ids)} but the drafter reads "
            f"{list(c.target_layer_ids)}; build TargetModel with the drafter's target_layer_ids"
        )
    if not 0 <= c.mask_token_id < target.vocab_size:
        raise ValueError(
            f"drafter mask_token_id={c.mask_token_id} is outside the target vocabulary [0, {target.vocab_size - 1}]"
        )


def _check_inputs(
    prompts: Sequence[Sequence[int]], temperatures: Iterable[float], max_new_tokens: int, vocab: int
) -> None:
    for t in temperatures:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(
                f"eval.temperatures contains {t!r}; temperatures must be finite and >= 0 (0 = greedy)"
            )
    if max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens={max_new_tokens}: must be >= 1")
    if not prompts:
        raise ValueError("no evaluation prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab - 1}]")


def _prompt_seed(seed: int, index: int) -> int:
    # One seed per prompt: a prompt's output does not depend on which other prompts ran before it.
    return seed * 1_000_003 + index


@dataclass
class DecodeRun:
    """Everything one dataset at one temperature produced."""

    temperature: float
    rounds_by_prompt: List[List] = field(default_factory=list)
    spec_tokens: int = 0
    spec_time: float = 0.0
    base_tokens: int = 0
    base_time: float = 0.0
    identical: int = 0
    draft_time: float = 0.0
    verify_time: float = 0.0

    @property
    def rounds(self) -> List:
        return [r for rs in self.rounds_by_prompt for r in rs]


@torch.no_grad()
def decode(
    target,
    drafter,
    prompts: List[List[int]],
    cfg,
    temperature: float,
    stop_ids: List[int],
    progress: bool = True,
    desc: str = "eval",
    baseline: bool = True,
) -> DecodeRun:
    """Decode every prompt with drafter + target (and, with ``baseline``, with the target alone),
    ``cfg.batch_size`` prompts at a time. Each prompt has its own seed, so its output depends neither
    on the prompts before it nor on those sharing its batch."""
    from tqdm.auto import tqdm

    dev = target.device
    size = int(getattr(cfg, "batch_size", 1))
    use_cache = bool(getattr(cfg, "draft_cache", True))
    run = DecodeRun(temperature)

    def streams(first: int, n: int) -> List[torch.Generator]:
        return [torch.Generator(device=dev).manual_seed(_prompt_seed(cfg.seed, first + j)) for j in range(n)]

    bar = tqdm(total=len(prompts), desc=f"{desc} T={temperature:g}", disable=not progress)
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        gens = streams(start, len(chunk))
        spec = generate(target, drafter, chunk, cfg.max_new_tokens, temperature, stop_ids, gens, use_cache)
        base = None
        if baseline:
            gens = streams(start, len(chunk))
            base = generate(target, None, chunk, cfg.max_new_tokens, temperature, stop_ids, gens)
        for j, s in enumerate(spec):
            run.rounds_by_prompt.append(s.rounds)
            run.spec_tokens += len(s.tokens)
            run.spec_time += s.total_time
            run.draft_time += sum(r.draft_time for r in s.rounds)
            run.verify_time += sum(r.verify_time for r in s.rounds)
            if base is not None:
                run.base_tokens += len(base[j].tokens)
                run.base_time += base[j].total_time
                run.identical += s.tokens == base[j].tokens
        bar.update(len(chunk))
    bar.close()
    return run


def decode_stats(run: DecodeRun, gamma: int, num_prompts: int, baseline: bool = True) -> Dict:
    """The acceptance and speed statistics of one :class:`DecodeRun` (the keys eval.json always had)."""
    rounds = run.rounds
    stats = metrics.summarize(rounds, gamma)
    spec_tps = metrics.tokens_per_second(run.spec_tokens, run.spec_time)
    base_tps = metrics.tokens_per_second(run.base_tokens, run.base_time) if baseline else float("nan")
    n = max(len(rounds), 1)
    stats.update(
        temperature=run.temperature,
        num_prompts=num_prompts,
        spec_new_tokens=run.spec_tokens,
        target_new_tokens=run.base_tokens if baseline else None,
        spec_tokens_per_s=spec_tps,
        target_tokens_per_s=base_tps,
        speedup=spec_tps / base_tps if base_tps > 0 else float("nan"),
        draft_time_s=run.draft_time,
        verify_time_s=run.verify_time,
        draft_ms_per_round=1000 * run.draft_time / n,
        verify_ms_per_round=1000 * run.verify_time / n,
        # At T=0 this should be num_prompts (lossless); a shortfall means numerical ties
        # (e.g. bf16) or a bug. At T>0 outputs legitimately differ.
        identical_outputs=run.identical if baseline else None,
    )
    return stats


def _warm_up(target, drafter, prompts, cfg, stop_ids) -> None:
    # Untimed: first calls pay one-off costs (allocations, kernel selection).
    warm = min(8, cfg.max_new_tokens)
    chunk = prompts[: int(getattr(cfg, "batch_size", 1))]
    generate(target, drafter, chunk, warm, 0.0, stop_ids, draft_cache=bool(getattr(cfg, "draft_cache", True)))
    generate(target, None, chunk, warm, 0.0, stop_ids)


@torch.no_grad()
def evaluate_datasets(
    target,
    drafter,
    datasets: Dict[str, List[List[int]]],
    cfg,
    stop_ids: Iterable[int],
    out_dir: Optional[str] = None,
    progress: bool = True,
    sps=None,
) -> Dict:
    """The evaluation protocol (docs/method.md) on each named prompt set, plus calibration, threshold sweep and scheduler.

    cfg: an :class:`~deepspec.config.EvalConfig`. ``sps``: a measured
    :class:`~deepspec.eval.scheduler.SPSCurve` (profiled here when the scheduler is on and none is
    given). Writes ``out_dir/eval.json`` (and plots); the top-level ``temperatures`` block is the
    first dataset's, every dataset's is under ``datasets``.
    """
    from deepspec.eval.analysis import analyze

    check_compatible(target, drafter)
    if not datasets:
        raise ValueError("no evaluation datasets")
    temps = [float(t) for t in cfg.temperatures]
    size = getattr(cfg, "batch_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"eval.batch_size={size!r}: must be an integer >= 1 (prompts decoded together)")
    for name, prompts in datasets.items():
        try:
            _check_inputs(prompts, cfg.temperatures, cfg.max_new_tokens, target.vocab_size)
        except ValueError as e:
            raise ValueError(f"dataset {name!r}: {e}") from None
    stop_ids = [int(s) for s in stop_ids]
    gamma = drafter.config.block_size
    baseline = bool(getattr(cfg, "baseline", True))
    use_sched = bool(getattr(cfg, "scheduler", False)) and drafter.config.enable_confidence_head

    was_training = drafter.training
    drafter.eval()
    try:
        _warm_up(target, drafter, next(iter(datasets.values())), cfg, stop_ids)
        if use_sched and sps is None:
            from deepspec.eval.profile import default_token_counts, profile_sps

            counts = default_token_counts(gamma + 1, max(cfg.concurrency))
            if progress:
                print(f"profiling target steps/s at B = {counts} tokens per step")
            sps = profile_sps(target, counts, gamma + 1, cfg.profile_context, cfg.profile_repeats, cfg.seed)
        per_dataset, runs = {}, []
        for name, prompts in datasets.items():
            per_temp = {}
            for temp in temps:
                run = decode(target, drafter, prompts, cfg, temp, stop_ids, progress, name, baseline)
                stats = decode_stats(run, gamma, len(prompts), baseline)
                c = drafter.config
                event = c.confidence_event(temp) if c.enable_confidence_head else None
                stats.update(
                    analyze(
                        run.rounds_by_prompt,
                        _with_defaults(cfg),
                        sps if use_sched else None,
                        event=event,
                        stored_sts=c.sts_for(temp) if c.enable_confidence_head else None,
                    )
                )
                stats["confidence_event"] = event
                per_temp[str(temp)] = stats
                runs.append((name, temp, run))
            per_dataset[name] = {"num_prompts": len(prompts), "temperatures": per_temp}
    finally:
        drafter.train(was_training)

    first = next(iter(per_dataset))
    report = {
        "block_size": gamma,
        "target_layer_ids": list(drafter.config.target_layer_ids),
        "markov_rank": drafter.config.markov_rank,
        "markov_head_type": drafter.config.markov_head_type,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "batch_size": int(getattr(cfg, "batch_size", 1)),
        "draft_cache": bool(getattr(cfg, "draft_cache", True)),
        "num_prompts": per_dataset[first]["num_prompts"],
        "temperatures": per_dataset[first]["temperatures"],
        "primary_dataset": first,
        "datasets": per_dataset,
        "sps_profile": sps.to_dict() if sps is not None else None,
        "device": str(target.device),
    }
    report = finite_or_none(report)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic.write_json(os.path.join(out_dir, "eval.json"), report)
        write_rounds(os.path.join(out_dir, "rounds.jsonl"), runs)
        if getattr(cfg, "plots", False):
            from deepspec.eval.plots import write_plots

            report_plots = write_plots(report, out_dir)
            if progress and report_plots:
                print(f"plots: {', '.join(os.path.basename(p) for p in report_plots)}")
    if progress:
        print(format_table(report))
    return report


def _with_defaults(cfg):
    """An EvalConfig-like view with every analysis key (callers may pass a bare namespace)."""
    from deepspec.config import EvalConfig

    base = EvalConfig()
    names = [f.name for f in dataclasses.fields(EvalConfig)]
    return SimpleNamespace(**{n: getattr(cfg, n, getattr(base, n)) for n in names})


def evaluate(
    target,
    drafter,
    prompts: List[List[int]],
    cfg,
    stop_ids: Iterable[int],
    out_dir: Optional[str] = None,
    progress: bool = True,
    sps=None,
    dataset_name: str = "prompts",
) -> Dict:
    """Run the evaluation protocol (docs/method.md) on one prompt set; returns the report dict (also ``out_dir/eval.json``).

    cfg: an :class:`~deepspec.config.EvalConfig` (temperatures, max_new_tokens, seed, analysis keys).
    """
    return evaluate_datasets(target, drafter, {dataset_name: prompts}, cfg, stop_ids, out_dir, progress, sps)
