#!/bin/bash
# Train the learned editors (MEND, KE and SERAC unless METHODS names some) on the default model, 5 minutes each
# (1 thread), on CounterFact's train split (first 2000 records).
# Usage: [METHODS="mend ke serac"] [WAIT=pid] benchmarks/results/train_editors.sh
source "$(dirname "$0")/common.sh"
while [ -n "$WAIT" ] && kill -0 $WAIT 2>/dev/null; do sleep 5; done
for method in ${METHODS:-mend ke serac}; do
  echo "$(date) start training $method"
  .venv/bin/hf-knowedit train-editor --method $method \
    --dataset ../shared/data/counterfact_easyedit/counterfact-train.json --n 2000 \
    --output runs/$method-smollm2 --max-minutes 5 \
    --set validation_size=16 --set eval_every=50 --set save_every=50 --set log_every=10
  rc=$?
  echo "$(date) end training $method rc=$rc"
done
