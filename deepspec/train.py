"""Train a drafter: ``accelerate launch deepspec/train.py recipe=tiny train.lr=3e-4 ...``.

Hydra composes configs/train.yaml with a recipe and validates every key against the typed schema in
deepspec/config/, so an unknown or mistyped override stops here with the key's name.
"""

from deepspec.entrypoint import hydra_entry  # first import: see deepspec/entrypoint.py


@hydra_entry("train")
def main(cfg) -> None:
    import logging
    import sys

    from accelerate import PartialState

    from deepspec.config import ConfigError
    from deepspec.training.loop import train

    logging.getLogger("deepspec").setLevel(logging.INFO)
    try:
        out = train(cfg)
    except ConfigError as e:  # a bad value: one line naming the key, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    state = PartialState()
    if not cfg.train.dry_run and state.is_main_process:  # once, not once per process
        print(f"run finished: {out}")
    if state.num_processes > 1:
        # Left to interpreter exit, gloo's worker threads are torn down mid-flight and a rank now and
        # then aborts ("terminate called without an active exception") after a run that succeeded.
        state.wait_for_everyone()
        state.destroy_process_group()


if __name__ == "__main__":
    main()
