#!/usr/bin/env bash
# Shared driver of the recipes/<family>/run.sh scripts: regenerate -> (collect) -> train -> eval -> export.
# Every stage resumes where it stopped, so after a preemption just run the same command again.
#
# Variables (set by the family script or the caller):
#   RECIPE       Hydra recipe (configs/recipe/<RECIPE>.yaml)
#   PROMPTS      prompt dataset: hub name or local jsonl/json/parquet (docs/data.md)
#   WORK         folder for everything this run writes            (default outputs/recipes/$RECIPE)
#   MODE         online (target features per batch) | offline (collect a feature cache first)
#   GPUS         processes per machine                             (default: all visible GPUs, else 1)
#   LAUNCH       accelerate config for training                    (default configs/accelerate/deepspeed_zero2.yaml)
#   REGEN_ARGS   sampling overrides for regeneration (family defaults in each run.sh)
#   SERVERS      optional OpenAI-compatible URLs for regeneration, e.g. "[http://h1:8000/v1,http://h2:8000/v1]"
#   STAGES       which stages to run (default "plan regen collect train eval export")
#   EXTRA        more Hydra overrides for every stage (e.g. "target.name_or_path=/models/qwen3-8b")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${RECIPE:?set RECIPE}"
: "${PROMPTS:?set PROMPTS to a prompt dataset (hub name or local file), see recipes/$RECIPE/README.md}"
WORK=${WORK:-outputs/recipes/$RECIPE}
MODE=${MODE:-online}
GPUS=${GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
LAUNCH=${LAUNCH:-configs/accelerate/deepspeed_zero2.yaml}
STAGES=${STAGES:-plan regen collect train eval export}
REGEN_ARGS=${REGEN_ARGS:-}
EXTRA=${EXTRA:-}
EVAL_ARGS=${EVAL_ARGS:-"eval.datasets=[gsm8k,humaneval,mt-bench]"}
ANSWERS="$WORK/answers.jsonl"
CACHE="$WORK/cache"
RUN="$WORK/train"

if [[ "$MODE" == offline ]]; then
  DATA="data.source=cache data.cache_dir=$CACHE"
else
  DATA="data.source=chat data.path=$ANSWERS"
fi
has() { [[ " $STAGES " == *" $1 "* ]]; }
say() { printf '\n=== %s\n' "$*"; }
mkdir -p "$WORK"

if has plan; then
  say "plan: $RECIPE on $GPUS process(es)"
  WORLD_SIZE=$GPUS python deepspec/train.py recipe="$RECIPE" train.output_dir="$RUN" train.dry_run=true $EXTRA | tail -n 12
fi

if has regen; then
  say "1. regenerate answers with the target -> $ANSWERS (deepspec/regenerate.py, resumable)"
  BACKEND=""
  [[ -n "${SERVERS:-}" ]] && BACKEND="regen.backend=openai regen.urls=$SERVERS"
  python deepspec/regenerate.py recipe="$RECIPE" regen.input="$PROMPTS" regen.output="$ANSWERS" regen.resume=true \
    $BACKEND $REGEN_ARGS $EXTRA
fi

if has collect && [[ "$MODE" == offline ]]; then
  say "2. collect the offline feature cache -> $CACHE (deepspec/collect.py, resumable)"
  accelerate launch --num_processes "$GPUS" deepspec/collect.py recipe="$RECIPE" data.source=chat \
    data.path="$ANSWERS" collect.cache_dir="$CACHE" $EXTRA
fi

if has train; then
  say "3. train -> $RUN (resumes from its newest checkpoint if there is one)"
  accelerate launch --config_file "$LAUNCH" --num_processes "$GPUS" deepspec/train.py recipe="$RECIPE" \
    train.output_dir="$RUN" $DATA $EXTRA
fi

if has eval; then
  say "4. evaluate with real speculative decoding -> $RUN/eval (deepspec/evaluate.py)"
  python deepspec/evaluate.py recipe="$RECIPE" eval.drafter="$RUN" $EVAL_ARGS $EXTRA
fi

if has export; then
  say "5. export for vLLM (speculators format) -> $RUN/export/speculators (deepspec/export.py)"
  python deepspec/export.py export.checkpoint="$RUN" export.format=speculators export.overwrite=true $EXTRA
fi
