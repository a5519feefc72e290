"""How much of the target's next-token distribution a pruned draft vocabulary can hold.

    PYTHONPATH=. python scripts/draft_vocab_coverage.py --sizes 512,1024,2048 --sequences 64
    PYTHONPATH=. python scripts/draft_vocab_coverage.py --sizes 1024 -- target.tiny.preset=base

A drafter with ``model.draft_vocab_size=d`` proposes only tokens of its draft vocabulary D (the d
tokens most often trained on, chosen exactly as training chooses them). At T = 1 a draft is accepted
with probability Σ_v min(p(v), q(v)) ≤ Σ_{v∈D} p(v) = m, the target's mass inside D; at T = 0 only
when the target's argmax is in D. So however well it is trained, a pruned drafter's per-slot
acceptance is capped by m (T = 1) or by the argmax rate (T = 0). This script measures both on the
run's held-out answers (the target's teacher-forced distribution at every answer token), and the τ
of a drafter that is perfect inside D (it proposes p restricted to D, so slot k of a round at
position t passes with probability m_{t+k-1}) relative to a perfect full-vocabulary drafter, at each
γ of ``--gammas``: the largest τ ratio pruning can leave (docs/benchmarks.md, Draft vocabulary).

Writes ``<out>/draft_vocab_coverage.json`` and ``.md`` and prints the table. Arguments after ``--``
are Hydra overrides of the training config (``recipe=tiny`` unless given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled

from deepspec import atomic  # noqa: E402
from deepspec.entrypoint import compose_config, split_overrides  # noqa: E402


def perfect_tau(mass: torch.Tensor, gamma: int) -> float:
    """Mean over start positions t of Σ_{k=0..γ} Π_{j<k} mass[t+j] (a round stops at the sequence end)."""
    n = mass.numel()
    total = 0.0
    for t in range(n):
        run, tau = 1.0, 1.0  # the bonus token is always emitted
        for j in range(min(gamma, n - t)):
            run *= float(mass[t + j])
            tau += run
        total += tau
    return total / max(1, n)


def main(argv: Optional[List[str]] = None) -> Dict:
    argv, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(description="Target mass inside a pruned draft vocabulary.")
    ap.add_argument("--sizes", default="512,1024,2048", help="draft vocabulary sizes d")
    ap.add_argument("--gammas", default="7,15", help="block sizes for the perfect-drafter τ ratio")
    ap.add_argument("--sequences", type=int, default=64, help="held-out answers measured")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="outputs/draft_vocab_coverage")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    gammas = [int(g) for g in args.gammas.split(",") if g]
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from deepspec.data.chat import template_kwargs_of
    from deepspec.models.vocab import always_kept_ids, answer_token_counts, maps_from_ids, select_draft_ids
    from deepspec.target.loading import open_target
    from deepspec.training.setup import load_records, tokenize_records, train_examples

    cfg = compose_config(overrides)
    info = open_target(cfg)
    splits = load_records(cfg)
    examples = train_examples(cfg, info.tokenizer, splits["train"])
    vocab = int(info.config["vocab_size"])
    counts = answer_token_counts(examples, vocab)
    keep = always_kept_ids(info.tokenizer, info.config, info.tokenizer.mask_token_id)
    # d -> t2d, bool [V]: the target tokens of that draft vocabulary
    inside_of = {d: maps_from_ids(select_draft_ids(counts, d, keep), vocab)[1] for d in sizes}

    heldout = tokenize_records(
        splits["heldout"][: args.sequences],
        info.tokenizer,
        cfg.data.max_length,
        template_kwargs_of(cfg.data),
        what="held-out",
    )
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32, use_safetensors=True).eval()
    masses: Dict[int, List[torch.Tensor]] = {d: [] for d in sizes}
    in_argmax = {d: 0 for d in sizes}
    label_in = {d: 0 for d in sizes}
    positions = 0
    with torch.inference_mode():
        for ex in heldout:
            ids = torch.tensor(ex.input_ids, dtype=torch.long)[None]
            mask = torch.tensor(ex.loss_mask, dtype=torch.bool)
            # logits at position i predict token i+1; keep the positions whose next token is an answer token
            pred = mask[1:]
            probs = torch.softmax(model(ids).logits[0, :-1].float(), dim=-1)[pred]
            labels = ids[0, 1:][pred]
            top = probs.argmax(-1)
            positions += labels.numel()
            for d, inside in inside_of.items():
                masses[d].append(probs[:, inside].sum(-1))
                in_argmax[d] += int(inside[top].sum())
                label_in[d] += int(inside[labels].sum())
    rows = []
    for d in sizes:
        row = {
            "draft_vocab_size": d,
            "fraction_of_vocab": d / vocab,
            "mean_target_mass_inside": float(torch.cat(masses[d]).mean()),
            "argmax_inside": in_argmax[d] / max(1, positions),
            "labels_inside": label_in[d] / max(1, positions),
        }
        for (
            g
        ) in gammas:  # per answer, so a round never runs past its end; vs a perfect full-vocabulary drafter
            num = sum(perfect_tau(m, g) * m.numel() for m in masses[d])
            den = sum(perfect_tau(torch.ones_like(m), g) * m.numel() for m in masses[d])
            row[f"perfect_tau_ratio_gamma{g}"] = num / den
        rows.append(row)
    rep = {
        "command": "PYTHONPATH=. python scripts/draft_vocab_coverage.py " + " ".join(sys.argv[1:]),
        "target": info.path,
        "vocab_size": vocab,
        "heldout_sequences": len(heldout),
        "answer_positions": positions,
        "rows": rows,
    }
    head = "| d | d / V | target mass inside D (T = 1 ceiling) | argmax in D (T = 0 ceiling) | label in D | "
    head += " | ".join(f"perfect-drafter τ ratio, γ = {g}" for g in gammas) + " |"
    lines = [
        f"Target {info.path} (V = {vocab}); {len(heldout)} held-out answers, {positions} answer positions.",
        "",
        head,
        "| " + " | ".join(["---"] * (5 + len(gammas))) + " |",
    ]
    for r in rows:
        cells = [
            f"{r['draft_vocab_size']:,}",
            f"{r['fraction_of_vocab']:.3f}",
            f"{r['mean_target_mass_inside']:.4f}",
            f"{r['argmax_inside']:.4f}",
            f"{r['labels_inside']:.4f}",
        ] + [f"{r[f'perfect_tau_ratio_gamma{g}']:.4f}" for g in gammas]
        lines.append("| " + " | ".join(cells) + " |")
    rep["markdown"] = "\n".join(lines) + "\n"
    print(rep["markdown"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "draft_vocab_coverage.json", {k: v for k, v in rep.items() if k != "markdown"})
    atomic.write_text(out / "draft_vocab_coverage.md", rep["markdown"])
    return rep


if __name__ == "__main__":
    main()
