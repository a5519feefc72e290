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
