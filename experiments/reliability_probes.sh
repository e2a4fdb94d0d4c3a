#!/usr/bin/env bash
# The probes of docs/reliability.md (run directories): usage experiments/reliability_probes.sh SRC_ROOT OUT
# runs them against the recadapt source in SRC_ROOT/src (this checkout: ., an old commit: a git worktree of it)
# with this checkout's .venv and test fixture, writing runs under OUT; about a minute on 2 cores.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
SRC=$(cd "$1" && pwd); OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY="env PYTHONPATH=$SRC/src $REPO/.venv/bin/python"
FIX=$REPO/tests/fixtures/recbole/patterns/patterns
ARGS="train --config $REPO/configs/sasrec.yaml --dataset=recbole:$FIX data.prepared_dir=$OUT/prepared output_dir=$OUT/runs model.hidden_size=16 train.n_boot=10 train.patience=0"
echo "== P1 two concurrent trainers into one run directory"
$PY -m recadapt.cli $ARGS name=shared train.epochs=40 > $OUT/a.out 2>&1 & A=$!
sleep 1.5
$PY -m recadapt.cli $ARGS name=shared train.epochs=40 > $OUT/b.out 2>&1 & B=$!
wait $A; echo "first rc $?"; wait $B; echo "second rc $?"; tail -1 $OUT/b.out
echo "log.csv epoch column: $(tail -n +2 $OUT/runs/shared/log.csv | cut -d, -f1 | tr '\n' ' ')"
echo "== P2 epochs=6 on a finished 4-epoch run"
$PY -m recadapt.cli $ARGS name=four train.epochs=4 > /dev/null 2>&1
$PY -m recadapt.cli $ARGS name=four train.epochs=6 > $OUT/p2.out 2>&1; echo "rc $?"; tail -2 $OUT/p2.out
echo "config.yaml epochs: $(grep '  epochs' $OUT/runs/four/config.yaml); metrics epochs_run: $(grep -o '"epochs_run": [0-9]*' $OUT/runs/four/metrics.json)"
echo "== P3 random bytes in optimizer.pt"
$PY -m recadapt.cli $ARGS name=dmg train.epochs=2 > /dev/null 2>&1
$PY - <<PYEOF
import json, os; p="$OUT/runs/dmg/checkpoint/"; s=json.load(open(p+"state.json")); s.update(finished=False, epoch=1)
json.dump(s, open(p+"state.json","w")); open(p+"optimizer.pt","wb").write(os.urandom(4096))
PYEOF
$PY -m recadapt.cli $ARGS name=dmg train.epochs=2 > $OUT/p3.out 2>&1; echo "rc $?"; echo "stderr lines: $(wc -l < $OUT/p3.out)"; tail -1 $OUT/p3.out
echo "== P4 SIGKILL between the two renames of a checkpoint replace, then the same command"
cd "$REPO/tests"
RECADAPT_TEST_KILL_IN=rename RECADAPT_TEST_KILL_NTH=2 $PY -c "from kill_in_checkpoint import KILL_IN_CHECKPOINT as K; exec(K)" $ARGS name=killed train.epochs=5 > /dev/null 2>&1; echo "killed rc $?"
echo "after kill: $(ls -a $OUT/runs/killed | tr '\n' ' ')"
$PY -m recadapt.cli $ARGS name=killed train.epochs=5 > /dev/null 2>&1; echo "resume rc $?"
echo "log.csv epoch column: $(tail -n +2 $OUT/runs/killed/log.csv | cut -d, -f1 | tr '\n' ' ')"
echo "after resume: $(ls -a $OUT/runs/killed | tr '\n' ' ')"
