#!/usr/bin/env bash
# Reproduce the "artist tags in the prompt" section of docs/results/next_item_lastfm.md: zero-shot, TALLRec and
# LLaRA on LastFM next-item with every artist written as "Name (tag, tag, tag)" (llm.item_tags=3: its three most
# used HetRec tags) in the history and the candidate list; answers, generate-mode matching, the constrained trie
# and score mode still use the bare names. SmolLM2-135M on 2 CPU cores.
# Usage: experiments/lastfm_tags.sh [DATA_DIR] [SAMPLES]   (defaults ../shared/data, 256)
# Needs runs/crm/sasrec-lastfm-next-item-s0 (experiments/crm.sh) for LLaRA's item embeddings.
#
# Budget: SAMPLES training rows (the first of the same fixed permutation every LastFM run uses), 1 epoch of
# optimizer steps of 8 samples (4 x 2 accumulation) at lr 1e-3, LoRA r 8 on every projection; evaluation on all
# 122 test users in the three ranking modes. TALLRec and LLaRA train side by side with one torch thread each
# (two lanes: 1.55x the throughput of one 2-thread job), zero-shot follows TALLRec in its lane. Tagged prompts
# are about 3x longer than the names-only ones (~650 tokens), and each training process peaks at ~10 GB.
# Runs go to runs/llm/<method>-tags-lastfm-next-item-s0/; finished runs are skipped, interrupted ones resume.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data}
SAMPLES=${2:-256}
OUT=runs/llm
mkdir -p "$OUT/logs"

lane() {  # lane METHOD...: train + evaluate each method in turn, one thread
  for method in "$@"; do
    local extra=""
    [ "$method" = llara ] && extra="llm.crm_run=runs/crm/sasrec-lastfm-next-item-s0"
    echo "$(date -u +%H:%M:%S) start $method"
    # shellcheck disable=SC2086  # extra is a word list
    .venv/bin/recadapt train --config "configs/$method.yaml" --dataset lastfm --data-dir "$DATA" output_dir=$OUT \
      llm.train_samples="$SAMPLES" llm.epochs=1 llm.grad_accum=2 llm.lr=1e-3 llm.projector_lr=1e-3 \
      llm.checkpoint_every=8 llm.item_tags=3 train.num_threads=1 name="$method-tags-lastfm-next-item-s0" $extra \
      > "$OUT/logs/$method-tags.log" 2>&1
    echo "$(date -u +%H:%M:%S) done  $method"
  done
}

lane tallrec zero-shot &
lane llara &
wait
.venv/bin/recadapt report $OUT/zero-shot-tags-lastfm-next-item-s0 $OUT/tallrec-tags-lastfm-next-item-s0 \
  $OUT/llara-tags-lastfm-next-item-s0 runs/crm/sasrec-lastfm-next-item-s0 \
  --label-by-name --out docs/results/next_item_lastfm_tags.md \
  --title "Next-item on LastFM with artist tags in the prompt, SmolLM2-135M, $SAMPLES training samples (122 test users)"
