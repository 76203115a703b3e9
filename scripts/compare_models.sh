#!/usr/bin/env bash
# Compare exported models (or checkpoints) the way the shipping rule reads them (docs/RESULTS.md §13-14):
#   - source-held-out test of the default policies, as is (sources held out of the *candidate's* training), and
#     restricted to the sources none of the compared models trained on (`--exclude-sources-of`), where a policy
#     left without unsafe rows takes its F1 from the hand-written held-out set;
#   - the hand-written held-out set (16 policies, never trained by any model) and the fresh hand-written set
#     (prompt_injection and content_safety, written blind after the seed batch 4 families were chosen: §17);
#   - first-contact probes and moderation-style sets judged as /classify's `flagged`;
#   - zero-shot policies (scope and topic policies no model trained on), and the blind hand-written scope set
#     (training/data/scopes_blind: four scope policies written as customers would, at their files' threshold, 0.5).
# Usage: scripts/compare_models.sh SHARED_DATA OUT MODEL [MODEL ...]   (one JSON per set and model under OUT/)
#        REUSE_SETS=1 scripts/compare_models.sh SHARED_DATA OUT MODEL ...   (score more models on OUT/sets; list the
#        first run's models so "sources neither trained on" covers the new ones too)
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 SHARED_DATA OUT MODEL [MODEL ...]" >&2; exit 2; }
DATA=$1
OUT=$2
shift 2
MODELS=("$@")
DEFAULTS=(prompt_injection toxicity content_safety financial_advice tax_advice)
ZERO_SHOT=(scope_cooking scope_hr privacy defamation intellectual_property gambling)
BIN=${BIN:-.venv/bin}
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
mkdir -p "$OUT"

if [ "${REUSE_SETS:-0}" = 1 ] && [ -d "$OUT/sets" ]; then
  # Score more models on the sets an earlier run built (their "unseen" sources are that run's models').
  echo "== evaluation sets: reusing $OUT/sets"
else
  echo "== evaluation sets"
  "$BIN/uniguard" data evalset --split sho_test --data "$DATA" --policies "${DEFAULTS[@]}" --out "$OUT/sets/sho-test"
  "$BIN/uniguard" data evalset --split sho_test --data "$DATA" --policies "${DEFAULTS[@]}" \
    --exclude-sources-of "${MODELS[@]}" --out "$OUT/sets/sho-test-unseen"
  "$BIN/uniguard" data evalset --split val test --data "$DATA" --policies "${ZERO_SHOT[@]}" --cap 40 \
    --out "$OUT/sets/zero-shot"
fi

i=$(find "$OUT" -mindepth 1 -maxdepth 1 -name '[0-9]*-*' | wc -l)  # number the new models after earlier ones
for model in "${MODELS[@]}"; do
  i=$((i + 1))
  dir="$OUT/$i-$(basename "$model")"
  mkdir -p "$dir"
  echo "$model" >"$dir/MODEL"
  echo "== $i: $model"
  for set in sho-test sho-test-unseen zero-shot; do
    "$BIN/uniguard" eval --model "$model" --data "$OUT/sets/$set/rows.jsonl" --policies "$OUT/sets/$set/policies" \
      --json "$dir/$set.json"
  done
  "$BIN/uniguard" eval --model "$model" --data training/data/heldout --split all \
    --policies training/data/policies training/data/heldout/policies --json "$dir/heldout.json"
  "$BIN/uniguard" eval --model "$model" --data training/data/fresh --split all --json "$dir/fresh.json"
  "$BIN/uniguard" eval --model "$model" --data training/data/scopes_blind --split all \
    --policies training/data/scopes_blind/policies --json "$dir/scopes-blind.json"
  "$BIN/uniguard" eval --model "$model" --data training/data/probes --flagged "${DEFAULTS[@]}" \
    --json "$dir/probes.json"
  "$BIN/uniguard" eval --model "$model" --data "$DATA/toxicity" "$DATA/content_safety" "$DATA/benign" \
    --split sho_test --cap 400 --flagged toxicity content_safety --json "$dir/moderation.json"
  echo "-- $model: source-held-out test (candidate's held-out sources)"
  "$BIN/uniguard" data summary "$dir/sho-test.json" --heldout "$dir/heldout.json" | tee "$dir/sho-test.md"
  echo "-- $model: source-held-out test, only sources no compared model trained on"
  "$BIN/uniguard" data summary "$dir/sho-test-unseen.json" --heldout "$dir/heldout.json" | tee "$dir/sho-test-unseen.md"
done
echo "done: $OUT"
