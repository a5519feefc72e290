"""Collect the offline target cache (docs/data.md):

    accelerate launch deepspec/collect.py collect.cache_dir=cache/tiny-fp8 collect.dtype=fp8 \\
        [data.source=chat data.path=data/regen.jsonl] [collect.estimate_only=true]
    python deepspec/collect.py collect.backend=vllm collect.tensor_parallel_size=8 ...   # features from vLLM

Hydra (configs/collect.yaml, the training config tree, so data/target/model keys mean the same as
in training). Prints the size estimate first; rerunning an interrupted collection resumes it.
Exit status 0 on success, 1 on an error a user can act on.
"""

import sys

from deepspec.entrypoint import hydra_entry  # first import: see deepspec/entrypoint.py


@hydra_entry("collect")
def main(cfg) -> None:
    import logging

    from deepspec.config import ConfigError
    from deepspec.data.cache import CacheError
    from deepspec.data.collector import collect
    from deepspec.data.prompts import DataError
    from deepspec.engine.procs import EngineError

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        collect(cfg, progress_bar=sys.stderr.isatty())
    except (ConfigError, CacheError, DataError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
