"""Regenerate a prompt set's answers with the target (docs/data.md).

    python deepspec/regenerate.py regen.input=prompts.jsonl regen.output=data/regen.jsonl \\
        [regen.backend=openai regen.urls=[http://h1:8000/v1,http://h2:8000/v1]] [data.enable_thinking=false] [--resume]

Hydra (configs/regenerate.yaml, the training config tree): sampling settings come from the recipe
(`regen.sampling`, or `regen.thinking_sampling` with data.enable_thinking=true). `--resume` is
short for regen.resume=true. Exit status 0 on success, 1 on an error a user can act on.
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="regenerate")
def main(cfg) -> None:
    import logging

    from deepspec.data.prompts import DataError
    from deepspec.data.regenerate import RegenerateError, regenerate

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        regenerate(cfg, progress_bar=sys.stderr.isatty())
    except (RegenerateError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _translate_flags(argv):
    return [("regen.resume=true" if a == "--resume" else a) for a in argv]


if __name__ == "__main__":
    sys.argv = _translate_flags(sys.argv)
    main()
