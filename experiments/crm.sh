#!/usr/bin/env bash
# Reproduce docs/results/crm.md: conventional recommenders under the three protocols, three seeds each.
# Usage: experiments/crm.sh [DATA_DIR] [JOBS]    (defaults: ../shared/data, 2 parallel single-thread jobs)
# Each run writes runs/crm/<model>-<dataset>-<protocol>-s<seed>/ (config, logs, best model, metrics.json);
# finished runs are skipped and interrupted ones resume, so the script can simply be run again after a stop.
# The queue is ordered seed-major, so a partial run still covers every table row.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
JOBS=${2:-2}
BIN=.venv/bin
OUT=runs/crm
mkdir -p "$OUT/logs"

# 1. persist every split once (sequentially, before parallel training reads them)
$BIN/recadapt data prepare --data-dir "$DATA" --dataset lastfm --protocol next-item
$BIN/recadapt data prepare --data-dir "$DATA" --dataset ml-100k --protocol next-item ctr full-ranking
$BIN/recadapt data prepare --data-dir "$DATA" --dataset ml-1m-ctr --protocol ctr

# 2. the training queue: one line per run, "<config> <overrides...>"
NEXT="data.protocol=next-item train.epochs=40 train.patience=5"
CTR="data.protocol=ctr model.max_len=20 train.max_len=20 train.epochs=10 train.patience=2"
FULL="data.protocol=full-ranking model.max_len=20 train.max_len=20 train.epochs=40 train.patience=5"
queue() {
  for seed in 0 1 2; do
    for dataset in ml-100k lastfm; do
      for model in sasrec gru4rec caser; do
        echo "configs/$model.yaml data.dataset=$dataset $NEXT train.seed=$seed"
      done
    done
    for dataset in ml-1m-ctr ml-100k; do
      for model in sasrec din; do
        echo "configs/$model.yaml data.dataset=$dataset $CTR train.seed=$seed"
      done
    done
    echo "configs/sasrec.yaml data.dataset=ml-100k $FULL train.seed=$seed"
    # BERT4Rec (~1.5 min/epoch here) gets an 11-epoch budget: seed 0 was stopped there, and Laser uses its best model
    echo "configs/bert4rec.yaml data.dataset=ml-100k $FULL train.epochs=11 train.seed=$seed"
  done
}

run_one() {
  local config=$1; shift
  local log
  log="$OUT/logs/$(basename "$config" .yaml)_$(echo "$*" | tr ' =/' '___').log"
  if $BIN/recadapt train --config "$config" --data-dir "$DATA" output_dir="$OUT" train.num_threads=1 "$@" \
      > "$log" 2>&1; then
    echo "done: $config $*"
  else
    echo "FAILED: $config $* (see $log)"
  fi
}
export -f run_one
export BIN DATA OUT

queue | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

# 3. the table, CSV and plot
$BIN/recadapt report $(ls -d "$OUT"/*/ | grep -v /logs/) --out docs/results/crm_table.md \
  --title "Conventional recommenders"
