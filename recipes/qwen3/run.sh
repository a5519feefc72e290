#!/usr/bin/env bash
# Qwen3 DSpark drafter end to end (docs/method.md defaults): see recipes/qwen3/README.md.
#   PROMPTS=<prompt dataset> SIZE=8b recipes/qwen3/run.sh
SIZE=${SIZE:-8b}                          # 4b | 8b | 14b
case "$SIZE" in
  8b) export RECIPE=qwen3 ;;
  4b|14b) export RECIPE=qwen3-$SIZE ;;
  *) echo "SIZE must be 4b, 8b or 14b" >&2; exit 2 ;;
esac
# Non-thinking answers with Qwen3's recommended sampling (docs/method.md, Data); the template gets enable_thinking=false.
export REGEN_ARGS=${REGEN_ARGS:-"data.enable_thinking=false regen.sampling.temperature=0.7 regen.sampling.top_p=0.8 regen.sampling.top_k=20"}
exec "$(dirname "$0")/../common.sh"
