#!/usr/bin/env python
"""Build (or reuse) the embedded tiny target and print its folder and report.

Overrides are Hydra-style ``key=value`` pairs on TinyTargetConfig, checked against its schema:

    python scripts/build_tiny_target.py
    python scripts/build_tiny_target.py train_steps=50 max_files=200 cache_dir=/tmp/tt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from deepspec.config import TinyTargetConfig  # noqa: E402
from deepspec.target.tiny import build_tiny_target, load_report  # noqa: E402


def parse_overrides(argv) -> TinyTargetConfig:
    """TinyTargetConfig with ``key=value`` overrides; unknown keys and bad types raise with the key."""
    schema = OmegaConf.structured(TinyTargetConfig)
    merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(argv)))
    return OmegaConf.to_object(merged)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        print("\nfields (defaults):")
        print(OmegaConf.to_yaml(OmegaConf.structured(TinyTargetConfig)))
        return 0
    try:
        cfg = parse_overrides(argv)
    except (OmegaConfBaseException, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = build_tiny_target(cfg)
    report = load_report(folder)
    report.pop("config", None)
    print(folder)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
