#!/bin/bash
# Batch-editing sweeps for docs/results.md: the first N cases are taken in chunks of B, each chunk edited at once on the
# untouched model and scored right after its edit (the model is restored between chunks), for every B in BATCHES.
# Usage: [N=200] [BATCHES="10 100"] [DATASETS="counterfact"] [PROTOCOLS=token_accuracy,prob_comparison]
#        METHODS="name:config ..." benchmarks/results/run_batch_sweep.sh
#        A method without a config file is given as name:method:variant (FT: ft_m:ft:ft_m).
#        EXTRA_ARGS are added to every evaluation (e.g. --editor-sees-probes to grow a run made with that setting).
# Outputs: runs/<dataset>/<name>_batch<B> (batch size 1 is the single-edit run, runs/<dataset>/<name>_single); every
# run resumes from its JSONL.
source "$(dirname "$0")/common.sh"
[ -n "$METHODS" ] || { echo "set METHODS, e.g. METHODS=memit:editing_configs/memit/llama.json" >&2; exit 2; }
while [ -n "$WAIT" ] && kill -0 $WAIT 2>/dev/null; do sleep 5; done
for b in ${BATCHES:-10 100}; do
  for spec in $METHODS; do
    IFS=: read name config variant <<< "$spec"
    if [ -n "$variant" ]; then args="--method $config --set variant=$variant"; else args="--config $config"; fi
    for tag in ${DATASETS:-counterfact}; do
      data=$(dataset_file $tag) || exit 1
      out=runs/$tag/${name}_batch$b
      mkdir -p $out
      echo "$(date) start $out n=${N:-200}"
      .venv/bin/hf-knowedit evaluate $args --dataset $data --n ${N:-200} --mode batch --batch-size $b --fluency-tokens 0 \
        --protocols ${PROTOCOLS:-token_accuracy,prob_comparison} --output $out $EXTRA_ARGS
      rc=$?
      echo "$(date) end $out rc=$rc"
    done
  done
done
echo "$(date) batch sweep done"
