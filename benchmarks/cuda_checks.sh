#!/usr/bin/env bash
# The CUDA checks, in one time-boxed go, for a session lent a GPU (no network there, so the
# model is SmolLM2-1.7B's architecture with random weights: speed and memory do not depend on
# the weights). Each step has its own time limit and the script skips what would overrun
# BUDGET seconds, so one failure or a slow step still leaves the other figures.
#
#   bash benchmarks/cuda_checks.sh OUTDIR [SHAPE]      # SHAPE: see benchmarks/random_model.py --list
#
# Steps, most important first: LoRA throughput vs Trainer+peft and SFTTrainer (issue "speed and
# memory"); a LoRA run and QLoRA (nf4) training through `tuneforge train`; multi-LoRA decode
# steps gathered vs peft and end-to-end serving on the GPU; plan accuracy on CUDA; full
# fine-tuning throughput vs Trainer. Environment: DEVICE (cuda), TOKENIZER (a model spec or
# folder with the SmolLM2 tokenizer), BUDGET (seconds, default 480), PYTHON (python3).
set -u
OUT=${1:?usage: cuda_checks.sh OUTDIR [SHAPE]}
SHAPE=${2:-smollm2-1.7b}
DEV=${DEVICE:-cuda}
TOK=${TOKENIZER:-smollm2-135m-instruct}
BUDGET=${BUDGET:-480}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d)
LOG="$OUT/cuda_checks.log"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TUNEFORGE_ALLOCATOR=off HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME LIMIT_S COMMAND...: run it if the budget allows, log everything
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  if (( SECONDS + limit / 2 > BUDGET )); then echo "=== $name skipped: ${SECONDS}s of ${BUDGET}s spent" | tee -a "$LOG"; return; fi
  (( SECONDS + limit > BUDGET )) && limit=$(( BUDGET - SECONDS ))
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]|^\s*$" >> "$LOG"
  echo "--- $name: rc=${PIPESTATUS[0]} in $(( SECONDS - t0 ))s" | tee -a "$LOG"
}

write_config() {  # write_config NAME METHOD_YAML: a short `tuneforge train` of builtin:orders on the model
  cat > "$W/$1.yaml" <<YAML
model: {name: $W/model}
data: {train: ["builtin:orders?n=400&seed=0"], val_size: 0.05, test_size: 0.05, max_length: 256}
method: $2
train: {lr: 1.0e-4, max_steps: ${TRAIN_STEPS:-20}, batch_size: 8, eval_every: 10, save_every: 0, device: $DEV, seed: 0}
eval: {metric: none}
output_dir: $W/runs
run_name: $1
YAML
}
write_config lora "{name: lora, r: 16, alpha: 32, target_modules: all-linear}"
write_config qlora "{name: qlora, r: 16, alpha: 32, target_modules: all-linear}"
TP=${TP_ARGS:---steps 30 --batch 16 --max-length 512}

{ nvidia-smi -L; $PY -c "import torch, transformers, peft, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"; } 2>&1 | tee -a "$LOG"
step model 180 $PY "$HERE/random_model.py" "$SHAPE" "$W/model" --tokenizer "$TOK"
step throughput_lora 240 $PY "$HERE/train_throughput.py" --device "$DEV" --model "$W/model" $TP --epochs 3 --runners tuneforge,trainer,sft_trainer --json "$OUT/throughput_lora.json"
step train_lora 150 $PY -m tuneforge train "$W/lora.yaml" --force
step train_qlora 150 $PY -m tuneforge train "$W/qlora.yaml" --force
for r in lora qlora; do [ -f "$W/runs/$r/summary.json" ] && { echo "$r summary:"; cat "$W/runs/$r/summary.json"; } | tee -a "$LOG"; done
step multilora_step 150 $PY "$HERE/multilora_step.py" "$W/runs/lora" --device "$DEV" --rows 16 --prompt 60 --steps ${DECODE_STEPS:-16} --repeats 3
step serve_throughput 150 $PY "$HERE/serve_throughput.py" "$W/runs/lora" --device "$DEV" --prompts 16 --tokens ${SERVE_TOKENS:-32} --skip-single
step plan_accuracy 150 $PY "$HERE/plan_accuracy.py" --device "$DEV" --model "$W/model" ${PLAN_ARGS:---batch 8 --seq 512} --methods full,lora,qlora
step throughput_full 200 $PY "$HERE/train_throughput.py" --device "$DEV" --model "$W/model" --method full $TP \
  --epochs 2 --runners tuneforge,trainer --json "$OUT/throughput_full.json"
echo "total ${SECONDS}s" | tee -a "$LOG"
