#!/usr/bin/env bash
# docs/results/crm.md, "Sampled ranking": SASRec under the sampled-ranking protocol (leave-one-out, the target
# among 19 sampled negatives) on ml-100k and on a RecBole dataset (the synthetic `cf` set of the learnability
# suite), trained once on the uniform split and scored on both the uniform and the popularity-sampled candidates
# (training rows are the same in both splits; only the candidate lists differ).
# Usage: experiments/sampled_ranking.sh [DATA_DIR]     resumable: finished runs are skipped
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
BIN=.venv/bin
OUT=runs/crm
mkdir -p "$OUT/logs" runs/synth
SYNTH=runs/synth/synth-cf-s0/synth-cf-s0
[ -f "$SYNTH.inter" ] || $BIN/recadapt data synth --variant cf --out runs/synth
SASREC="model.max_len=20 train.max_len=20 train.epochs=12 train.patience=3"
for dataset in ml-100k "recbole:$SYNTH"; do
  label=$(basename "$dataset")
  name=sasrec-$label-sampled-ranking-s0
  $BIN/recadapt --quiet train --config configs/sasrec.yaml --protocol sampled-ranking --dataset "$dataset" \
    --data-dir "$DATA" $SASREC output_dir=$OUT name=$name > "$OUT/logs/$name.log" 2>&1
  # the same model on the popularity-sampled candidates
  $BIN/python - "$OUT/$name" "$DATA" <<'PY' | tee "$OUT/$name/test-popularity.txt"
import sys
from pathlib import Path
from recadapt.io import write_json_atomic
from recadapt.cf import load_crm
from recadapt.data.store import ensure_prepared
from recadapt.tasks.evaluate import evaluate_crm
from recadapt.train.config import load_config
run = Path(sys.argv[1])
config = load_config(run / "config.yaml")
data = config.data
prepared = ensure_prepared(data.dataset, data.protocol, data_root=sys.argv[2], out_root=data.prepared_dir,
                           seed=data.split_seed, params={"negatives": "popularity"})
report = evaluate_crm(load_crm(run / "best"), prepared.parts["test"], data.protocol, prepared.n_items,
                      config.train.max_len, n_boot=config.train.n_boot)
for key, e in report.items():
    print(f"popularity {key:<10} {e.value:.4f} [{e.low:.4f}, {e.high:.4f}]")
write_json_atomic(run / "test-popularity.json", {k: v.to_dict() for k, v in report.items()})
PY
done
