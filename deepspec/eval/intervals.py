"""95 % intervals for benchmark figures, by bootstrap over training seeds and prompts.

A benchmark figure here (τ, a ratio of two drafters' τ, a scheduler's gain) is a ratio of sums over
prompts, pooled over the runs of several training seeds. Its uncertainty has two sources: which
prompts were sampled and which seed trained the drafter. The bootstrap resamples both, the way the
data arose (docs/benchmarks.md, Intervals): seeds with replacement, then each drawn seed's prompts
with replacement, and recomputes the figure from the resampled sums. With one seed only prompts are
resampled, and the interval says nothing about seed-to-seed variation; the result records how many
seeds and prompts it saw so a reader can tell.

Comparisons are paired: two drafters trained with the same seed were evaluated on the same prompts,
so one draw picks the same (seed, prompt) units for both. That removes the prompt-difficulty
variance both share, which is most of it.

The random draw is seeded, so the same inputs give the same interval on every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 4000


@dataclass
class Interval:
    value: float  # the figure on the data as observed
    low: float
    high: float
    level: float
    seeds: int
    prompts: int  # prompts per seed (the smallest, if they differ)

    def excludes(self, x: float) -> bool:
        """True when the interval lies wholly above or below ``x``: only then is a difference claimed."""
        return self.low > x or self.high < x

    def to_dict(self) -> Dict:
        return asdict(self)

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap(
    groups: Sequence[np.ndarray],
    stat: Callable[[np.ndarray], np.ndarray],
    n_boot: int = N_BOOT,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Percentile interval of ``stat`` over a two-level bootstrap.

    ``groups[s]`` is a [prompts, K] array for training seed s: one row per prompt, K per-prompt sums
    (e.g. rounds and accepted drafts). ``stat`` maps column totals [..., K] to the figure [...].
    """
    mats = [np.asarray(g, dtype=np.float64) for g in groups]
    if not mats:
        raise ValueError("bootstrap: no seeds given")
    k = mats[0].shape[1] if mats[0].ndim == 2 else -1
    for i, m in enumerate(mats):
        if m.ndim != 2 or m.shape[1] != k or m.shape[0] == 0:
            raise ValueError(
                f"bootstrap: seed {i} has shape {m.shape}; expected [prompts >= 1, {k}] like seed 0"
            )
    value = float(stat(sum(m.sum(0) for m in mats)))
    rng = np.random.default_rng(seed)
    n_seeds = len(mats)
    # totals[j][s]: seed s's prompts resampled for the j-th seed slot of every replicate, [n_boot, K]
    picked = rng.integers(0, n_seeds, size=(n_boot, n_seeds)) if n_seeds > 1 else np.zeros((n_boot, 1), int)
    total = np.zeros((n_boot, k))
    for j in range(n_seeds):
        for s, m in enumerate(mats):
            rows = m.shape[0]
            weights = rng.multinomial(rows, np.full(rows, 1.0 / rows), size=n_boot)  # [n_boot, rows]
            total += (picked[:, j] == s)[:, None] * (weights @ m)
    reps = np.asarray(stat(total), dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha]) if reps.size else (np.nan, np.nan)
    return Interval(value, float(low), float(high), level, n_seeds, min(m.shape[0] for m in mats))


def tau_interval(counts: Sequence[Sequence[Sequence[int]]], **kw) -> Interval:
    """τ = 1 + Σ accepted / Σ rounds. ``counts[seed][prompt] = (rounds, accepted)``."""
    return bootstrap([np.asarray(c, dtype=np.float64).reshape(-1, 2) for c in counts], _tau, **kw)


def tau_ratio_interval(a: Sequence, b: Sequence, **kw) -> Interval:
    """τ_a / τ_b, paired by seed and prompt: ``a[seed][prompt]`` and ``b[seed][prompt]`` must be the
    same prompts (same count per seed), each ``(rounds, accepted)``."""
    if len(a) != len(b):
        raise ValueError(f"tau_ratio_interval: {len(a)} seeds vs {len(b)}; pair runs by seed")
    groups = []
    for s, (ca, cb) in enumerate(zip(a, b)):
        ma, mb = np.asarray(ca, np.float64).reshape(-1, 2), np.asarray(cb, np.float64).reshape(-1, 2)
        if ma.shape != mb.shape:
            raise ValueError(
                f"tau_ratio_interval: seed {s} has {ma.shape[0]} vs {mb.shape[0]} prompts; "
                "a paired comparison needs the same prompts on both sides"
            )
        groups.append(np.concatenate([ma, mb], axis=1))
    return bootstrap(groups, _tau_ratio, **kw)


def gain_ratio_interval(a1: Sequence, b1: Sequence, a2: Sequence, b2: Sequence, **kw) -> Interval:
    """(τ_a1 / τ_b1) / (τ_a2 / τ_b2): whether a's gain over b differs between two settings (e.g. two block
    sizes). All four are paired by seed and prompt, as in :func:`tau_ratio_interval`."""
    sides = [a1, b1, a2, b2]
    if len({len(x) for x in sides}) != 1:
        raise ValueError(f"gain_ratio_interval: seeds per side {[len(x) for x in sides]}; pair runs by seed")
    groups = []
    for s in range(len(a1)):
        mats = [np.asarray(x[s], np.float64).reshape(-1, 2) for x in sides]
        if len({m.shape for m in mats}) != 1:
            raise ValueError(
                f"gain_ratio_interval: seed {s} has {[m.shape[0] for m in mats]} prompts; "
                "a paired comparison needs the same prompts on every side"
            )
        groups.append(np.concatenate(mats, axis=1))
    return bootstrap(groups, _gain_ratio, **kw)


def mean_interval(values: Sequence[Sequence[float]], **kw) -> Interval:
    """Mean of a per-prompt figure, pooled over seeds. ``values[seed][prompt]``."""
    groups = [np.stack([np.asarray(v, np.float64), np.ones(len(v))], axis=1) for v in values]
    return bootstrap(groups, lambda t: t[..., 0] / t[..., 1], **kw)


def ratio_of_sums_interval(num: Sequence[Sequence[float]], den: Sequence[Sequence[float]], **kw) -> Interval:
    """Σ num / Σ den over prompts and seeds (e.g. tokens / seconds). ``num[seed][prompt]``."""
    groups = [
        np.stack([np.asarray(n, np.float64), np.asarray(d, np.float64)], axis=1) for n, d in zip(num, den)
    ]
    return bootstrap(groups, lambda t: t[..., 0] / t[..., 1], **kw)


def _tau(t: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 + t[..., 1] / t[..., 0]


def _tau_ratio(t: np.ndarray) -> np.ndarray:
    return _tau(t[..., 0:2]) / _tau(t[..., 2:4])


def _gain_ratio(t: np.ndarray) -> np.ndarray:
    return _tau_ratio(t[..., 0:4]) / _tau_ratio(t[..., 4:8])


def prompt_counts(
    rounds: Sequence[Dict], temperature: float, dataset: str | None = None, num_prompts: int | None = None
) -> List[List[int]]:
    """Per-prompt ``[rounds, accepted]`` from the records of a run's rounds.jsonl (deepspec/eval/report.py),
    in prompt order, for one temperature (and dataset, when the file holds several).

    With ``num_prompts`` the list has exactly that many rows, ``[0, 0]`` for a prompt that ran no
    round (its first token ended the turn), so two runs on the same prompts stay aligned for pairing."""
    per: Dict[int, List[int]] = {}
    for r in rounds:
        if float(r["temperature"]) != float(temperature):
            continue
        if dataset is not None and r.get("dataset") != dataset:
            continue
        c = per.setdefault(int(r["prompt"]), [0, 0])
        c[0] += 1
        c[1] += int(r["accepted"])
    if not per:
        raise ValueError(
            f"no rounds at temperature {temperature}" + (f" in dataset {dataset!r}" if dataset else "")
        )
    if num_prompts is None:
        return [per[i] for i in sorted(per)]
    if max(per) >= num_prompts:
        raise ValueError(f"rounds of prompt {max(per)} found, but num_prompts={num_prompts}")
    return [per.get(i, [0, 0]) for i in range(num_prompts)]
