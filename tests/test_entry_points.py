"""The five entry points run three ways (as a file, as ``python -m deepspec.<stage>``, as the console
script ``deepspec-<stage>``) and answer ``--help`` / ``--cfg job`` without loading a model."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "collect", "evaluate", "export", "regenerate")
# After the entry point returns: was a model library imported? (--help and --cfg job must not need one)
NO_MODEL = (
    "import atexit, sys; atexit.register(lambda: print('model libs loaded:', 'transformers' in sys.modules))"
)


def _run(args, code: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _console(stage: str, *args: str) -> subprocess.CompletedProcess:
    """What the wrapper pip generates for ``deepspec-<stage>`` runs (the wrapper itself exists only
    after an install): import the target named in pyproject and exit with its return value."""
    module, func = _scripts()[f"deepspec-{stage}"].split(":")
    code = f"{NO_MODEL}; sys.argv[0] = 'deepspec-{stage}'; from {module} import {func}; sys.exit({func}())"
    return _run(list(args), code)


def _scripts() -> dict:
    """[project.scripts] of pyproject.toml (read by hand: tomllib is Python >= 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^\[project\.scripts\]\n((?:[^\[\n].*\n|\n)*)", text, re.MULTILINE).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', block, re.MULTILINE))


def test_pyproject_names_a_console_script_for_every_stage():
    assert _scripts() == {f"deepspec-{s}": f"deepspec.{s}:main" for s in STAGES}


@pytest.mark.parametrize("stage", STAGES)
def test_console_script_prints_the_job_config_without_loading_a_model(stage):
    r = _console(stage, "--cfg", "job")
    assert "target:" in r.stdout and "name_or_path:" in r.stdout
    assert "model libs loaded: False" in r.stdout


@pytest.mark.parametrize("stage", STAGES)
def test_python_dash_m_prints_help(stage):
    r = _run(["-m", f"deepspec.{stage}", "--help"])
    assert f"{stage} is powered by Hydra" in r.stdout and "== Config ==" in r.stdout


def test_script_file_form_as_accelerate_launch_runs_it():
    r = _run([str(REPO / "deepspec" / "train.py"), "--cfg", "job", "train.lr=0.000123"])
    assert "lr: 0.000123" in r.stdout


def test_export_check_and_regenerate_resume_go_through_main():
    assert "usage:" in _console("export", "check", "--help").stdout
    r = _console("regenerate", "--resume", "--cfg", "job")
    regen = re.search(r"^regen:\n((?:  .*\n)+)", r.stdout, re.MULTILINE).group(1)  # the regen: block only
    assert "\n  resume: true\n" in "\n" + regen


def test_importing_the_entry_helper_takes_the_script_folder_off_sys_path(monkeypatch):
    import deepspec.entrypoint as entry

    monkeypatch.setattr(sys, "path", [entry.PACKAGE_DIR, *sys.path])
    importlib.reload(entry)  # what the first import does when a script runs as a file
    assert entry.PACKAGE_DIR not in sys.path[:1]
