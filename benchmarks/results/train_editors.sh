#!/bin/bash
# Train the learned editors (MEND, KE and SERAC unless METHODS names some) on the default model, on CounterFact's
# train split (first 2000 records), for a fixed number of steps (about 5 minutes each on one thread): training is
# seeded and runs in a fixed order, so the same steps give the same editor up to float rounding on another checkout
# (KE's logged losses agreed to six or seven digits, its weights' SHA-256 did not: docs/results.md, "What is not
# done"), and the runs that use an editor record the SHA-256 of its weights (settings.json, summary.json: "editor").
# Usage: [METHODS="mend ke serac"] [STEPS=N (all methods)] [WAIT=pid] benchmarks/results/train_editors.sh
source "$(dirname "$0")/common.sh"
while [ -n "$WAIT" ] && kill -0 $WAIT 2>/dev/null; do sleep 5; done
declare -A DEFAULT_STEPS=([mend]=100 [ke]=70 [serac]=75)
for method in ${METHODS:-mend ke serac}; do
  steps=${STEPS:-${DEFAULT_STEPS[$method]}}
  echo "$(date) start training $method ($steps steps)"
  .venv/bin/hf-knowedit train-editor --method $method \
    --dataset ../shared/data/counterfact_easyedit/counterfact-train.json --n 2000 \
    --output runs/$method-smollm2 --max-steps $steps \
    --set validation_size=16 --set eval_every=50 --set save_every=50 --set log_every=10
  rc=$?
  echo "$(date) end training $method rc=$rc"
done
