#!/usr/bin/env bash
# Reproduce docs/results/crm.md: conventional recommenders under the three protocols, several seeds each.
# Usage: experiments/crm.sh [DATA_DIR] [JOBS]    (defaults: ../shared/data, 2 parallel single-thread jobs)
# Each run writes runs/crm/<name>/ (config, logs, best model, metrics.json); finished runs are skipped and
# interrupted ones resume, so the script can be re-run after a stop.
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
COMMON="output_dir=$OUT train.num_threads=1"
queue() {
  for seed in 0 1 2; do
    for dataset in lastfm ml-100k; do
      for model in sasrec gru4rec caser; do
        echo "configs/$model.yaml data.dataset=$dataset data.protocol=next-item train.seed=$seed train.epochs=60 train.patience=8"
      done
    done
    for dataset in ml-100k ml-1m-ctr; do
      echo "configs/sasrec.yaml data.dataset=$dataset data.protocol=ctr model.max_len=20 train.max_len=20 train.seed=$seed train.epochs=20 train.patience=2"
      echo "configs/din.yaml data.dataset=$dataset data.protocol=ctr model.max_len=20 train.max_len=20 train.seed=$seed train.epochs=20 train.patience=2"
    done
    echo "configs/sasrec.yaml data.dataset=ml-100k data.protocol=full-ranking model.max_len=20 train.max_len=20 train.seed=$seed train.epochs=60 train.patience=5"
  done
}

run_one() {
  local config=$1; shift
  local name
  name=$(echo "$*" | tr ' =' '\n\n' | awk 'NR%2==0' | tr '\n' '_' | sed 's/_$//')
  $BIN/recadapt train --config "$config" --data-dir "$DATA" $COMMON "$@" > "$OUT/logs/$(basename "$config" .yaml)_$name.log" 2>&1 \
    && echo "done: $config $*" || echo "FAILED: $config $* (see $OUT/logs)"
}
export -f run_one
export BIN DATA COMMON OUT

queue | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

# 3. the table, CSV and plot
$BIN/recadapt report "$OUT"/*/ --out docs/results/crm_table.md --title "Conventional recommenders"
