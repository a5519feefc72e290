"""What the five entry scripts share (train, collect, evaluate, export, regenerate).

Each one runs three ways: as a file (``python deepspec/train.py``, ``accelerate launch
deepspec/train.py``), as a module (``python -m deepspec.train``) and as a console script
(``deepspec-train``). Run as a file, Python puts the script's folder, deepspec/, first on sys.path,
where our subpackages named like top-level modules (data, eval, models, ...) would shadow them.
Each script imports this module before anything else, and importing it takes that entry away; it
imports only the standard library, so nothing can be shadowed before then.
"""

import os
import sys

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(os.path.dirname(PACKAGE_DIR), "configs")

if sys.path and os.path.abspath(sys.path[0]) == PACKAGE_DIR:
    sys.path.pop(0)


def hydra_entry(config_name: str):
    """``hydra.main`` over ``configs/<config_name>.yaml``, with the typed schema registered so every
    key, type and choice is checked (deepspec/config/)."""
    import hydra

    from deepspec.config import register_configs

    register_configs()
    return hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)


def split_overrides(argv=None):
    """``(script arguments, Hydra overrides)``: a benchmark script's own options come before ``--``,
    the overrides it passes on to every run after it (``argv`` None = the command line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def with_default_recipe(overrides):
    """``overrides`` as a list, led by ``recipe=tiny`` unless they name a recipe: a script's runs
    default to the embedded target, as the README's main job does."""
    overrides = list(overrides)
    return overrides if any(o.startswith("recipe=") for o in overrides) else ["recipe=tiny", *overrides]


def compose_config(overrides, config_name: str = "train"):
    """The validated config a script's runs will see: ``configs/<config_name>.yaml`` with the Hydra
    ``overrides`` (``recipe=tiny`` unless one is given), outside any Hydra app."""
    from hydra import compose, initialize_config_dir

    from deepspec.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name, overrides=with_default_recipe(overrides))
    validate(cfg)
    return cfg
