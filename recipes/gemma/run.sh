#!/usr/bin/env bash
# Gemma 4 DSpark drafter end to end: see recipes/gemma/README.md.
#   PROMPTS=<prompt dataset> EXTRA="target.name_or_path=<your gemma>" recipes/gemma/run.sh
export RECIPE=gemma
# Gemma's recommended sampling.
export REGEN_ARGS=${REGEN_ARGS:-"regen.sampling.temperature=1.0 regen.sampling.top_p=0.95 regen.sampling.top_k=64"}
exec "$(dirname "$0")/../common.sh"
