"""Regenerate a prompt set's answers with the target (docs/data.md).

    python deepspec/regenerate.py regen.input=prompts.jsonl regen.output=data/regen.jsonl \\
        [regen.backend=openai regen.urls=[http://h1:8000/v1,http://h2:8000/v1]] [data.enable_thinking=false] [--resume]

Hydra (configs/regenerate.yaml, the training config tree): sampling settings come from the recipe
(`regen.sampling`, or `regen.thinking_sampling` with data.enable_thinking=true). `--resume` is
short for regen.resume=true. Exit status 0 on success, 1 on an error a user can act on.
"""

import sys

from deepspec.entrypoint import hydra_entry  # first import: see deepspec/entrypoint.py


@hydra_entry("regenerate")
def regenerate_main(cfg) -> None:
    import logging

    from deepspec.config import ConfigError
    from deepspec.data.prompts import DataError
    from deepspec.data.regenerate import RegenerateError, regenerate

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        regenerate(cfg, progress_bar=sys.stderr.isatty())
    except (ConfigError, RegenerateError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _translate_flags(argv):
    return [("regen.resume=true" if a == "--resume" else a) for a in argv]


def main() -> None:
    sys.argv = _translate_flags(sys.argv)
    regenerate_main()


if __name__ == "__main__":
    main()
