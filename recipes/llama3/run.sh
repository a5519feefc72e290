#!/usr/bin/env bash
# Llama 3.x Instruct DSpark drafter end to end: see recipes/llama3/README.md.
#   PROMPTS=<prompt dataset> recipes/llama3/run.sh
export RECIPE=llama3
# The model's own generation_config sampling.
export REGEN_ARGS=${REGEN_ARGS:-"regen.sampling.temperature=0.6 regen.sampling.top_p=0.9 regen.sampling.top_k=0"}
exec "$(dirname "$0")/../common.sh"
