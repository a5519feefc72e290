"""Train a drafter: ``accelerate launch deepspec/train.py recipe=tiny train.lr=3e-4 ...``.

Hydra composes configs/train.yaml with a recipe and validates every key against the typed schema in
deepspec/config.py, so an unknown or mistyped override stops here with the key's name.
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


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg) -> None:
    import logging

    from deepspec.training.loop import train

    logging.getLogger("deepspec").setLevel(logging.INFO)
    from accelerate import PartialState

    out = train(cfg)
    if not cfg.train.dry_run and PartialState().is_main_process:  # once, not once per process
        print(f"run finished: {out}")


if __name__ == "__main__":
    main()
