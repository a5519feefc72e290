#!/usr/bin/env python
"""Evaluate a trained drafter with one part changed, to see what that part contributes to τ.

    python scripts/ablate_drafter.py RUN_OR_DRAFTER OUT --zero-markov -- recipe=tiny eval.num_prompts=32
    python scripts/ablate_drafter.py RUN_OR_DRAFTER OUT --draft-temperature 0 -- recipe=tiny

* ``--zero-markov``: a copy of the drafter whose Markov output factor (``markov_w2``) is zero, so
  every slot drafts from the backbone's logits alone (docs/method.md, Markov head).
* ``--draft-temperature t``: at decoding temperatures > 0 the drafter proposes from its logits at
  temperature ``t`` (0 = its argmax) instead of the decoding temperature. Verification still uses the
  distribution the draft was drawn from, so the output distribution stays the target's
  (docs/method.md, Evaluation protocol); only the acceptance changes.

Everything after ``--`` goes to ``deepspec/evaluate.py`` (``eval.output_dir`` is set to OUT/eval).
The copy is written to OUT/drafter; the original is never modified.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from deepspec.entrypoint import split_overrides  # noqa: E402


def drafter_folder(path: Path) -> Path:
    """A run folder's drafter/ or a drafter folder itself."""
    for d in (path / "drafter", path):
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    raise SystemExit(
        f"{path}: no drafter here (expected config.json + model.safetensors, or a drafter/ of them)"
    )


def copy_drafter(src: Path, dst: Path, zero_markov: bool) -> None:
    from safetensors.torch import load_file, save_file

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    if zero_markov:
        weights = load_file(str(dst / "model.safetensors"))
        keys = [k for k in weights if "markov_w2" in k]
        if not keys:
            raise SystemExit(f"{src}: this drafter has no Markov head (no markov_w2 weight)")
        for k in keys:
            weights[k] = weights[k] * 0
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


def patch_draft_temperature(t: float) -> None:
    """Drafters draw from ``distribution(logits, T)``: replace T > 0 by t in the drafter modules only
    (the target's side of verification keeps the decoding temperature)."""
    from deepspec.models import base, eagle3, parallel

    original = base.distribution

    def drafted(logits, temperature):
        return original(logits, t if temperature > 0 else temperature)

    # t = 0 gives a one-hot q, and sampling a one-hot q draws its argmax at any temperature.
    parallel.distribution = eagle3.distribution = drafted


def main(argv=None) -> int:
    argv, rest = split_overrides(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafter", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--zero-markov", action="store_true")
    ap.add_argument("--draft-temperature", type=float, default=None)
    args = ap.parse_args(argv)
    if args.draft_temperature is not None and args.draft_temperature < 0:
        ap.error(f"--draft-temperature {args.draft_temperature}: must be >= 0")
    copy_drafter(drafter_folder(args.drafter), args.out / "drafter", args.zero_markov)
    if args.draft_temperature is not None:
        patch_draft_temperature(args.draft_temperature)
    sys.argv = [
        sys.argv[0],
        f"eval.drafter={args.out / 'drafter'}",
        f"eval.output_dir={args.out / 'eval'}",
        *rest,
    ]
    from deepspec.evaluate import main as evaluate

    evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
