#!/usr/bin/env bash
# `make model`: rebuild the shipped default model end to end with the project's own commands:
#   train (MultiTaskGuard + TaskGuards) -> merge (bandit search) -> export cpu-int8 -> evaluate -> model card.
# Usage: scripts/build_model.sh [SHARED_DATA] [RUNS_DIR] [MODEL_DIR]
# Time on this 2-core machine: about 65 minutes with the defaults below (docs/RESULTS.md §2).
set -euo pipefail
DATA=${1:-../shared/data}
RUNS=${2:-runs}
OUT=${3:-models/uniguard-minilm}
VERSION=${UNIGUARD_MODEL_VERSION:-$(date +%Y.%m.%d)}
MT_MINUTES=${MT_MINUTES:-25}          # MultiTaskGuard time budget (the default recipe)
TG_MINUTES=${TG_MINUTES:-6}           # per TaskGuard
TG_POLICIES=${TG_POLICIES:-"prompt_injection toxicity content_safety financial_advice tax_advice"}
MERGE_ITERATIONS=${MERGE_ITERATIONS:-50}
MERGE_STRATEGIES=${MERGE_STRATEGIES:-thompson,random}  # the winner over both; report.json compares them
MERGE_ROWS=${MERGE_ROWS:-200}         # validation rows per policy in each of the search and held-out parts
TARGET_FPR=${TARGET_FPR:-0.1}         # thresholds: best recall with validation FPR <= this
SKIP_MERGE=${SKIP_MERGE:-0}           # 1: export the MultiTaskGuard as it is
SKIP_TRAIN=${SKIP_TRAIN:-0}           # 1: reuse the checkpoints already in RUNS (resume after training)
MODE=${MODE:-prefix}                  # attention mode of every model trained: prefix (default) or full (0.2.0's)

[ -d "$DATA" ] || { echo "build_model: $DATA is not a folder (pass the shared data folder)" >&2; exit 2; }
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
BIN=${BIN:-.venv/bin}
mkdir -p "$RUNS"

if [ "$SKIP_TRAIN" != 1 ]; then
  echo "== 1/5 MultiTaskGuard ($MT_MINUTES min budget)"
  "$BIN/uniguard" train multitask --data "$DATA" --out "$RUNS/multitask" --max-minutes "$MT_MINUTES" --mode "$MODE"
fi
candidates=("$RUNS/multitask")
for policy in $TG_POLICIES; do
  if [ "$SKIP_TRAIN" != 1 ]; then
    echo "== 2/5 TaskGuard $policy ($TG_MINUTES min budget)"
    "$BIN/uniguard" train taskguard --policy "$policy" --data "$DATA" --out "$RUNS/taskguard-$policy" \
      --max-minutes "$TG_MINUTES" --mode "$MODE"
  fi
  candidates+=("$RUNS/taskguard-$policy")
done

model="$RUNS/multitask"
if [ "$SKIP_MERGE" != 1 ]; then
  echo "== 3/5 UniGuard merge search ($MERGE_ITERATIONS iterations per strategy: $MERGE_STRATEGIES)"
  "$BIN/uniguard" merge search --candidates "${candidates[@]}" --val "$DATA" training/data/seed \
    --iterations "$MERGE_ITERATIONS" --strategy "$MERGE_STRATEGIES" --max-rows-per-policy "$MERGE_ROWS" \
    --full-report --out "$RUNS/uniguard"
  model="$RUNS/uniguard"
fi

echo "== 4/5 export cpu-int8 (parity gate on the validation split)"
"$BIN/uniguard" export --model "$model" --target cpu-int8 --out "$OUT" --name uniguard-minilm --version "$VERSION" \
  --val "$DATA" training/data/seed --split val --policy-dir training/data/policies --max-per-policy 300 \
  --recalibrate balanced --target-fpr "$TARGET_FPR"

echo "== 5/5 evaluation and model card"
"$BIN/uniguard" eval --model "$OUT" --data "$DATA" training/data/seed --split test \
  --policies training/data/policies --json "$RUNS/shipped-test.json"
"$BIN/uniguard" eval --model "$OUT" --data training/data/heldout --split all \
  --policies training/data/policies training/data/heldout/policies --json "$RUNS/shipped-heldout.json"
"$BIN/python" scripts/model_card.py "$OUT" "$RUNS/shipped-test.json" "$RUNS/shipped-heldout.json"
echo "done: $OUT"
