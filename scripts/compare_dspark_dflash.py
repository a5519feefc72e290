"""DSpark vs DFlash on the same recipe, data and steps (kept for old commands; see bench_drafters.py).

    python scripts/compare_dspark_dflash.py [hydra overrides applied to both runs ...]

Equivalent to ``scripts/bench_drafters.py --only main --runs DSpark-2L,DFlash-2L
--out outputs/compare_dspark_dflash -- <overrides>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_drafters import main  # noqa: E402

if __name__ == "__main__":
    main(
        [
            "--only",
            "main",
            "--runs",
            "DSpark-2L,DFlash-2L",
            "--out",
            "outputs/compare_dspark_dflash",
            "--",
            *sys.argv[1:],
        ]
    )
