"""Collect the offline target cache (docs/data.md):

    accelerate launch deepspec/collect.py collect.cache_dir=cache/tiny-fp8 collect.dtype=fp8 \\
        [data.source=chat data.path=data/regen.jsonl] [collect.estimate_only=true]

Hydra (configs/collect.yaml, the training config tree, so data/target/model keys mean the same as
in training). Prints the size estimate first; rerunning an interrupted collection resumes it.
Exit status 0 on success, 1 on an error a user can act on.
"""

import os
import sys

# Run as a script, this file's folder would shadow top-level modules named like ours (data, eval...).
_here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0]) == _here:
    sys.path.pop(0)

import hydra  # noqa: E402

from deepspec.config import register_configs  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(_here), "configs")
register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="collect")
def main(cfg) -> None:
    import logging

    from deepspec.data.cache import CacheError
    from deepspec.data.collector import collect
    from deepspec.data.prompts import DataError

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        collect(cfg, progress_bar=sys.stderr.isatty())
    except (CacheError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
