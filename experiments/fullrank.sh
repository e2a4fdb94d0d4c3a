#!/usr/bin/env bash
# Reproduce docs/results/full_ranking.md: Laser and DARec with SmolLM2-135M on ml-100k (full ranking, 943 users),
# on 2 CPU cores. Usage: [ABLATION_SEEDS="0"] experiments/fullrank.sh [DATA_DIR] [SEEDS]   (defaults: ../shared/data,
# seeds "0 1 2"; ablations on seed 0 only)
# Needs the CRM runs of experiments/crm.sh: runs/crm/bert4rec-ml-100k-full-ranking-s<seed> (Laser's frozen CRM)
# and runs/crm/sasrec-ml-100k-full-ranking-s<seed> (DARec's CF signal). Runs go to runs/fullrank/; finished runs
# are skipped and interrupted ones resume (the adapter search resumes its Optuna study).
#
# Budget (one process, 2 threads, fp32): prompts show the 10 most recent history items; 256 training samples
# (a fixed random subset of the training prefixes) in optimizer steps of 4 at lr 1e-3; Laser 1 stage-1 epoch +
# 1 stage-2 epoch, DARec 2 epochs;
# 100 validation users for model selection; 200 test users (a fixed subset; the CRMs are scored on the same users
# with `recadapt eval --samples 200`). The DARec search runs 6 trials of 128 samples x 1 epoch, once (seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
SEEDS=${2:-0 1 2}
BIN=.venv/bin
OUT=runs/fullrank
mkdir -p "$OUT/logs"
COMMON="output_dir=$OUT train.num_threads=2 train.max_len=10 llm.train_samples=256 llm.eval_samples=200 llm.grad_accum=1 llm.lr=1e-3
        model.valid_samples=100"
LASER="--config configs/laser.yaml --data-dir $DATA $COMMON model.stage1_epochs=1 model.stage2_epochs=1"
DAREC="--config configs/darec.yaml --data-dir $DATA $COMMON llm.epochs=2"

run() {  # run NAME COMMAND ARGS...: logged to runs/fullrank/logs/NAME.log
  local name=$1; shift
  echo "$(date -u +%H:%M:%S) start $name"
  $BIN/recadapt "$@" > "$OUT/logs/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) done  $name"
}

# 1. the four main rows, per seed. The adapter search runs once, on seed 0; every seed trains DARec with its plan.
PLAN_FILE=$OUT/darec-ml-100k-s0/best_plan.txt
for seed in $SEEDS; do
  SAS="llm.crm_run=runs/crm/sasrec-ml-100k-full-ranking-s$seed train.seed=$seed"
  BERT="llm.crm_run=runs/crm/bert4rec-ml-100k-full-ranking-s$seed train.seed=$seed"
  if [ "$seed" = 0 ]; then
    run darec-search-s0 search --trials 6 $DAREC $SAS name=darec-ml-100k-s0
  else
    run darec-s$seed train $DAREC $SAS name=darec-ml-100k-s$seed model.adapter_plan="$(cat "$PLAN_FILE")"
  fi
  run laser-s$seed train $LASER $BERT name=laser-ml-100k-s$seed
done

# 2. the ablations, seed 0 only (each ~12-16 min here; ABLATION_SEEDS="0 1 2" runs all three)
for seed in ${ABLATION_SEEDS:-0}; do
  SAS="llm.crm_run=runs/crm/sasrec-ml-100k-full-ranking-s$seed train.seed=$seed"
  BERT="llm.crm_run=runs/crm/bert4rec-ml-100k-full-ranking-s$seed train.seed=$seed"
  PLAN=$(cat "$PLAN_FILE")
  run darec-uniform-s$seed train $DAREC $SAS name=darec-uniform-lora-ml-100k-s$seed
  run laser-noprefix-s$seed train $LASER $BERT name=laser-noprefix-ml-100k-s$seed model.use_prefix=false
  run darec-nocf-s$seed train $DAREC $SAS name=darec-nocf-ml-100k-s$seed model.adapter_plan="$PLAN" \
    model.cf_injection=false
  run darec-nomask-s$seed train $DAREC $SAS name=darec-nomask-ml-100k-s$seed model.adapter_plan="$PLAN" \
    model.context_masking=false
  run laser-nomoe-s$seed train $LASER $BERT name=laser-nomoe-ml-100k-s$seed model.use_moe=false
  run laser-nostage1-s$seed train $LASER $BERT name=laser-nostage1-ml-100k-s$seed model.stage1_epochs=0 \
    model.stage2_epochs=2
done
