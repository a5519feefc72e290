"""PNG figures next to eval.json (matplotlib, Agg backend: no display needed).

acceptance_<dataset>.png         position-wise conditional acceptance and prefix survival per temperature
reliability_<dataset>_T<t>.png   reliability diagram of a_k per slot, raw vs after STS
threshold_<dataset>_T<t>.png     tokens/step, acceptance rate and waste vs the threshold on a_k
throughput_<dataset>_T<t>.png    simulated throughput and per-request speed vs concurrency per policy
"""

from __future__ import annotations

import math
import os
import re
from typing import Dict, List


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "data"


def _save(fig, path: str, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _xy(values):
    pts = [(k, v) for k, v in enumerate(values, start=1) if v is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def acceptance_plot(name: str, temps: Dict, path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for s in temps.values():
        axes[0].plot(
            *_xy(s["conditional_acceptance"]),
            marker="o",
            label=f"T={s['temperature']:g} (τ={s['tau'] or float('nan'):.2f})",
        )
        axes[1].plot(*_xy(s["survival"]), marker="o", label=f"T={s['temperature']:g}")
    axes[0].set(
        title=f"{name}: conditional acceptance",
        xlabel="slot k",
        ylabel="P(x_k acc | x_<k acc)",
        ylim=(0, 1.02),
    )
    axes[1].set(title="prefix survival", xlabel="slot k", ylabel="P(x_1..x_k accepted)", ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, plt)


def reliability_plot(title: str, conf: Dict, path: str) -> str:
    plt = _plt()
    n = len(conf["reliability_before"])
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= n:
            ax.axis("off")
            continue
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls="--")
        for key, label, color in (
            ("reliability_before", "raw", "tab:red"),
            ("reliability_after", "STS", "tab:blue"),
        ):
            bins = conf[key][k]
            ece = conf["before" if key.endswith("before") else "after"][k]["ece"]
            ax.plot(
                [b["mean_pred"] for b in bins],
                [b["frequency"] for b in bins],
                marker="o",
                ms=3,
                color=color,
                label=f"{label} ECE {100 * ece:.1f}%" if ece is not None else label,
            )
        ax.set(title=f"slot {k + 1}", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
        if k % cols == 0:
            ax.set_ylabel("observed survival")
        if k // cols == rows - 1:
            ax.set_xlabel("estimate a_k")
    fig.suptitle(title)
    return _save(fig, path, plt)


def threshold_plot(title: str, sweep: List[Dict], path: str) -> str:
    plt = _plt()
    t = [r["threshold"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].plot(t, [r["tokens_per_step"] for r in sweep], marker="o", label="realised")
    axes[0].plot(t, [r["expected_tokens_per_step"] for r in sweep], ls="--", label="expected")
    axes[0].set(title="tokens per target step", xlabel="threshold on a_k")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, [r["acceptance_rate"] for r in sweep], marker="o")
    axes[1].set(title="acceptance rate (accepted / verified)", xlabel="threshold on a_k", ylim=(0, 1.02))
    axes[2].plot(t, [r["wasted_per_step"] for r in sweep], marker="o", label="wasted")
    axes[2].plot(t, [r["mean_verify_len"] for r in sweep], ls="--", label="verified")
    axes[2].set(title="drafts per step", xlabel="threshold on a_k")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path, plt)


def throughput_plot(title: str, sched: Dict, path: str) -> str:
    plt = _plt()
    levels = sched["levels"]
    r = [row["concurrency"] for row in levels]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for policy in levels[0]["policies"]:
        label = policy if policy != "threshold" else f"threshold {sched['static_threshold']:g}"
        axes[0].plot(
            r, [row["policies"][policy]["realised_tokens_per_s"] for row in levels], marker="o", label=label
        )
        axes[1].plot(
            r,
            [row["policies"][policy]["per_request_tokens_per_s"] for row in levels],
            marker="o",
            label=label,
        )
    axes[0].set(
        title="throughput (realised)", xlabel="concurrent requests R", ylabel="tokens/s", xscale="log"
    )
    axes[1].set(title="per-request speed", xlabel="concurrent requests R", ylabel="tokens/s", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path, plt)


def write_plots(report: Dict, out_dir: str) -> List[str]:
    """All figures for an eval.json report; returns the paths written."""
    paths = []
    for name, d in (report.get("datasets") or {}).items():
        temps = d["temperatures"]
        base = _safe(name)
        paths.append(acceptance_plot(name, temps, os.path.join(out_dir, f"acceptance_{base}.png")))
        for s in temps.values():
            tag = f"{base}_T{s['temperature']:g}"
            title = f"{name}, T={s['temperature']:g}"
            if s.get("confidence"):
                paths.append(
                    reliability_plot(
                        f"{title}: reliability of a_k",
                        s["confidence"],
                        os.path.join(out_dir, f"reliability_{tag}.png"),
                    )
                )
            if s.get("threshold_sweep"):
                paths.append(
                    threshold_plot(
                        f"{title}: threshold sweep",
                        s["threshold_sweep"],
                        os.path.join(out_dir, f"threshold_{tag}.png"),
                    )
                )
            if s.get("scheduler"):
                paths.append(
                    throughput_plot(
                        f"{title}: simulated serving",
                        s["scheduler"],
                        os.path.join(out_dir, f"throughput_{tag}.png"),
                    )
                )
    return paths
