"""Export a drafter (native, vLLM speculators, z-lab DFlash), check it, card it, push it to the Hub.

Imports are lazy so that ``deepspec.exporting.native`` (used by the trainer) stays light.
"""

_API = {
    "load_export": "deepspec.exporting.writer",
    "export_drafter": "deepspec.exporting.writer",
    "check_export": "deepspec.exporting.check",
    "run_export": "deepspec.exporting.pipeline",
    "export_after_training": "deepspec.exporting.pipeline",
    "push_folder": "deepspec.exporting.hub",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'deepspec.exporting' has no attribute {name!r}")


__all__ = sorted(_API)
