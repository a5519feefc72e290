#!/usr/bin/env bash
# The CUDA paths in one short pass, for a session that is lent a GPU (one H200 through the device
# tool, ~15 min in all). Runs and logs go to $WORK (default outputs/gpu_check); $OUT (default
# $WORK) gets just two files, gpu_check.json with the figures and gpu_check.log with every step's
# log tail, since the device tool brings back only a few files. Each step has its own time limit
# and a failing step does not stop the others, so one run answers every question.
#
#   OUT=/tmp/gpu bash scripts/gpu_check.sh                 # needs the tiny target in .cache/deepspec
#   STEPS=100 bash scripts/gpu_check.sh                    # shorter training runs
#
# Checks: CUDA + bf16 support; bf16 mixed-precision training with flex attention vs SDPA (tokens/s,
# peak memory, loss) on the tiny recipe, single process without NCCL; the lossless evaluator on the
# GPU (T=0 outputs identical to the target's); the train-step benchmark (lean vs reference loss,
# torch.cuda.max_memory_allocated) at the Qwen3 vocabulary.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-outputs/gpu_check}
OUT=${OUT:-$WORK}
STEPS=${STEPS:-200}
mkdir -p "$WORK" "$OUT"
: >"$WORK/steps.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH=.

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$WORK/steps.txt"
}

step env 60 python -c "
import torch, json
ok = torch.cuda.is_available()
print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok,
                  'device': torch.cuda.get_device_name() if ok else None,
                  'bf16': ok and torch.cuda.is_bf16_supported()}))"

# Single process, no process group: nothing here may need NCCL.
for attn in flex sdpa; do
  step "train_$attn" 240 python deepspec/train.py recipe=tiny run_name="gpu-$attn" train.output_dir="$WORK/run_$attn" \
    train.mixed_precision=bf16 model.attn_impl="$attn" train.max_steps="$STEPS" train.progress_bar=false \
    train.checkpoint.every=0 eval.num_prompts=8 export.after_training=false
done

drafter="$WORK/run_flex"
[ -f "$drafter/drafter/config.json" ] || drafter="$WORK/run_sdpa"
echo "eval drafter: $drafter" >>"$WORK/steps.txt"
step eval 180 python deepspec/evaluate.py eval.drafter="$drafter" eval.num_prompts=32 eval.output_dir="$WORK/eval"

step bench_train_step 180 python scripts/bench_train_step.py --device cuda --repeats 5 --out "$WORK/bench_train_step"

for f in "$WORK"/*.log; do echo "==== $f"; tail -n 30 "$f"; done >"$OUT/gpu_check.log"

python - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
report = {"steps": (out / "steps.txt").read_text().splitlines()}
env_log = (out / "env.log").read_text().strip().splitlines()
report["env"] = json.loads(env_log[-1]) if env_log and env_log[-1].startswith("{") else env_log[-5:]
for attn in ("flex", "sdpa"):
    s = out / f"run_{attn}" / "train_summary.json"
    if s.is_file():
        d = json.loads(s.read_text())
        m = d["final_metrics"]
        report[f"train_{attn}"] = {k: m.get(k) for k in ("loss", "tau_est", "tokens_per_s", "peak_mem_gb")}
        report[f"train_{attn}"]["train_time_s"] = d.get("train_time_s")
e = out / "eval" / "eval.json"
if e.is_file():
    t = json.loads(e.read_text())["temperatures"]
    keys = ("tau", "identical_outputs", "num_prompts", "speedup")
    report["eval"] = {k: {x: v.get(x) for x in keys} for k, v in t.items()}
b = out / "bench_train_step" / "bench_train_step.json"
if b.is_file():
    report["bench_train_step"] = json.loads(b.read_text())
(Path(sys.argv[2]) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "bench_train_step"}, indent=2))
EOF
