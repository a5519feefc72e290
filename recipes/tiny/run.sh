#!/usr/bin/env bash
# The whole pipeline on the embedded tiny target, on CPU, no download: train (online, on the tiny chat
# data cut from the stdlib) -> evaluate -> export. NPROC=2 trains with DDP over gloo; LAUNCH=zero2 with
# DeepSpeed ZeRO-2 on CPU.
#   recipes/tiny/run.sh                 # ~10 min on 2 CPU cores the first time (the target is built once)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${WORK:-outputs/recipes/tiny}
NPROC=${NPROC:-1}
LAUNCH=${LAUNCH:-ddp}
RUN="$WORK/train"

python deepspec/train.py recipe=tiny train.output_dir="$RUN" train.dry_run=true | tail -n 10
echo "=== train -> $RUN (resumes from its newest checkpoint if interrupted)"
if [[ "$NPROC" == 1 ]]; then
  python deepspec/train.py recipe=tiny train.output_dir="$RUN" "$@"
elif [[ "$LAUNCH" == zero2 ]]; then
  accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes "$NPROC" \
    deepspec/train.py recipe=tiny train.output_dir="$RUN" "$@"
else
  torchrun --nproc_per_node "$NPROC" deepspec/train.py recipe=tiny train.output_dir="$RUN" "$@"
fi
# Training already evaluated the drafter on the held-out prompts ($RUN/eval.json); the standalone
# evaluator (deepspec/evaluate.py) adds calibration and scheduler simulation where it is available.
if [[ -f deepspec/evaluate.py ]]; then
  echo "=== evaluate -> $RUN/eval"
  python deepspec/evaluate.py recipe=tiny eval.drafter="$RUN"
fi
echo "=== export (vLLM speculators format) -> $RUN/export/speculators"
python deepspec/export.py export.checkpoint="$RUN" export.format=speculators export.overwrite=true
