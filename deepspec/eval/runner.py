"""Offline evaluation (SPEC §6): chain drafting, batch 1, full block, at each configured temperature.

Every prompt is decoded by drafter + target and by the plain target (same seed) so the report
carries both acceptance statistics and a wall-clock speed ratio. Results go to ``eval.json``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from deepspec.eval import metrics
from deepspec.eval.spec_decode import speculative_generate, target_generate


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


def _check_inputs(prompts: Sequence[Sequence[int]], temperatures: Iterable[float], max_new_tokens: int, vocab: int) -> None:
    for t in temperatures:
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"eval.temperatures contains {t!r}; temperatures must be finite and >= 0 (0 = greedy)")
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


def _finite_or_none(obj):
    # NaN (e.g. τ over zero rounds) is not valid JSON; write null instead.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(
    target,
    drafter,
    prompts: List[List[int]],
    cfg,
    stop_ids: Iterable[int],
    out_dir: Optional[str] = None,
    progress: bool = True,
) -> Dict:
    """Run the §6 protocol; returns the report dict (also written to ``out_dir/eval.json``).

    cfg: an :class:`~deepspec.config.EvalConfig` (temperatures, max_new_tokens, seed).
    """
    from tqdm.auto import tqdm

    check_compatible(target, drafter)
    temps = [float(t) for t in cfg.temperatures]
    _check_inputs(prompts, cfg.temperatures, cfg.max_new_tokens, target.vocab_size)
    stop_ids = [int(s) for s in stop_ids]
    dev = target.device
    gamma = drafter.config.block_size

    was_training = drafter.training
    drafter.eval()
    try:
        # Warm-up (untimed): first calls pay one-off costs (allocations, kernel selection).
        warm = min(8, cfg.max_new_tokens)
        speculative_generate(target, drafter, prompts[0], warm, 0.0, stop_ids)
        target_generate(target, prompts[0], warm, 0.0, stop_ids)

        per_temp = {}
        for temp in temps:
            rounds, spec_tokens, spec_time, base_tokens, base_time, same = [], 0, 0.0, 0, 0.0, 0
            draft_time = verify_time = 0.0
            for i, prompt in enumerate(tqdm(prompts, desc=f"eval T={temp:g}", disable=not progress)):
                gen = torch.Generator(device=dev).manual_seed(_prompt_seed(cfg.seed, i))
                s = speculative_generate(target, drafter, prompt, cfg.max_new_tokens, temp, stop_ids, gen)
                gen = torch.Generator(device=dev).manual_seed(_prompt_seed(cfg.seed, i))
                b = target_generate(target, prompt, cfg.max_new_tokens, temp, stop_ids, gen)
                rounds += s.rounds
                spec_tokens += len(s.tokens)
                spec_time += s.total_time
                draft_time += sum(r.draft_time for r in s.rounds)
                verify_time += sum(r.verify_time for r in s.rounds)
                base_tokens += len(b.tokens)
                base_time += b.total_time
                same += s.tokens == b.tokens
            stats = metrics.summarize(rounds, gamma)
            spec_tps = metrics.tokens_per_second(spec_tokens, spec_time)
            base_tps = metrics.tokens_per_second(base_tokens, base_time)
            stats.update(
                temperature=temp,
                num_prompts=len(prompts),
                spec_new_tokens=spec_tokens,
                target_new_tokens=base_tokens,
                spec_tokens_per_s=spec_tps,
                target_tokens_per_s=base_tps,
                speedup=spec_tps / base_tps if base_tps > 0 else float("nan"),
                draft_time_s=draft_time,
                verify_time_s=verify_time,
                # At T=0 this should be num_prompts (lossless); a shortfall means numerical ties
                # (e.g. bf16) or a bug. At T>0 outputs legitimately differ.
                identical_outputs=same,
            )
            per_temp[str(temp)] = stats
    finally:
        drafter.train(was_training)

    report = {
        "block_size": gamma,
        "target_layer_ids": list(drafter.config.target_layer_ids),
        "markov_rank": drafter.config.markov_rank,
        "markov_head_type": drafter.config.markov_head_type,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "num_prompts": len(prompts),
        "temperatures": per_temp,
    }
    report = _finite_or_none(report)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        _atomic_write_json(os.path.join(out_dir, "eval.json"), report)
    if progress:
        print(format_table(report))
    return report


def format_table(report: Dict) -> str:
    rows = [f"{'T':>5} {'tau':>6} {'accept':>7} {'spec tok/s':>11} {'target tok/s':>13} {'speedup':>8}"]
    for s in report["temperatures"].values():
        rows.append(
            f"{s['temperature']:>5g} {_num(s['tau'], 6, 3)} {_num(s['acceptance_rate'], 7, 3)} "
            f"{_num(s['spec_tokens_per_s'], 11, 1)} {_num(s['target_tokens_per_s'], 13, 1)} {_num(s['speedup'], 7, 2)}x"
        )
    return "\n".join(rows)


def _num(x, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"
