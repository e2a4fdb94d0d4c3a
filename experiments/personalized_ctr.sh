#!/usr/bin/env bash
# Reproduce docs/results/personalized_ctr.md: TALLRec, ReLLa, ReLLaX, RecLoRA and iLoRA on ml-1m-ctr (CTR, AUC and
# LogLoss) with SmolLM2-135M on 2 CPU cores, against SASRec and DIN.
# Usage: experiments/personalized_ctr.sh [DATA_DIR] [SHOTS] [SEED] [METHOD...]
#   defaults: ../shared/data, "256", 0, every method (tallrec reclora ilora rella rellax, in that order; rellax
#   needs the finished rella run of the same N and seed).
#   THREADS=1 sets torch's thread count, so two instances on disjoint method lists can share the 2 cores (1.55x
#   measured on next-item, see experiments/personalized_next_item.sh), e.g. "rella rellax" beside
#   "tallrec reclora ilora".
# Needs runs/crm/sasrec-ml-1m-ctr-ctr-s<seed> from experiments/crm.sh: SASRec trained on the whole training part
# (Few2Many) gives RecLoRA's and ReLLaX's user vectors, ReLLaX's soft-prompt item embeddings and iLoRA's gate input
# and hybrid-prompt item embeddings. Runs go to runs/llm/<name>-n<N>-s<seed>/; finished runs are skipped and
# interrupted ones resume.
#
# Budget, the same for every method (one CPU process, fp32): the persisted nested N-shot training set, 1 epoch of
# optimizer steps of 8 samples (4 x 2 accumulation) at lr 1e-3, LoRA r 8 on every projection; the prompt shows
# 10 history items; evaluation on a fixed 500-sample subset of the 7,331 test samples (the CRMs are scored on the
# same subset). ReLLa and ReLLaX train on both ReiT views (recent and retrieved), so they see 2N prompts.
# ReLLaX starts CFLoRA's A and B from the ReLLa run of the same N and freezes them (its published recipe).
#
# Environment (defaults in brackets): RECADAPT, the command [.venv/bin/recadapt] (e.g. "python3 -m recadapt.cli");
# OUT, the runs folder [runs/llm]; CRM, the SASRec run [runs/crm/sasrec-ml-1m-ctr-ctr-s<seed>]; EXTRA, overrides
# appended to every run (a GPU: "llm.batch_size=8 llm.grad_accum=1").
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
SHOTS=${2:-256}
SEED=${3:-0}
shift 3 || shift $#
METHODS=${*:-tallrec reclora ilora rella rellax}
RECADAPT=${RECADAPT:-.venv/bin/recadapt}
OUT=${OUT:-runs/llm}
CRM=${CRM:-runs/crm/sasrec-ml-1m-ctr-ctr-s$SEED}
EXTRA=${EXTRA:-}
mkdir -p "$OUT/logs"

run() {  # run NAME ARGS...: one training + evaluation, logged to runs/llm/logs/NAME.log
  local name=$1; shift
  echo "$(date -u +%H:%M:%S) start $name"
  # shellcheck disable=SC2086  # RECADAPT and EXTRA are word lists
  $RECADAPT train "$@" $EXTRA name="$name" > "$OUT/logs/$name.log" 2>&1
  echo "$(date -u +%H:%M:%S) done  $name"
}

for n in $SHOTS; do
  CTR="--dataset ml-1m-ctr --protocol ctr --data-dir $DATA output_dir=$OUT train.seed=$SEED train.max_len=10
       train.num_threads=${THREADS:-0}
       llm.train_samples=$n llm.epochs=1 llm.grad_accum=2 llm.lr=1e-3 llm.projector_lr=1e-3
       llm.checkpoint_every=16 llm.eval_samples=500"
  tag=ml1m-ctr-n$n-s$SEED
  for method in $METHODS; do
    case $method in
      tallrec) run tallrec-$tag --config configs/tallrec.yaml $CTR ;;
      reclora) run reclora-$tag --config configs/reclora.yaml $CTR llm.crm_run=$CRM ;;
      ilora) run ilora-$tag --config configs/ilora.yaml $CTR llm.crm_run=$CRM ;;
      rella) run rella-$tag --config configs/rella.yaml $CTR ;;
      rellax) run rellax-$tag --config configs/rellax.yaml $CTR llm.crm_run=$CRM llm.init_lora_from=$OUT/rella-$tag \
        "llm.adapter_options={freeze_ab: true}" ;;
      *) echo "unknown method $method" >&2; exit 2 ;;
    esac
  done
done
