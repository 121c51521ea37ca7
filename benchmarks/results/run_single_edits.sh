#!/bin/bash
# Results queue for docs/results.md: every method on CounterFact and zsRE, single edits, first a small n for every
# method, then grown to 200 (the harness resumes a run whose n grows in single mode).
# Usage: SIZES="25 200" [METHODS="name:config ..."] benchmarks/results/run_single_edits.sh
# The learned editors (MEND, KE, SERAC) are trained first when missing (benchmarks/results/train_editors.sh, for
# fixed steps).
# EXTRA_ARGS are added to every evaluation (e.g. --editor-sees-probes to grow a run made with that setting);
# DATASETS="counterfact" limits the runs to one dataset (default: counterfact zsre).
source "$(dirname "$0")/common.sh"
run() {  # run NAME CONFIG DATASET_TAG N
  local name=$1 config=$2 tag=$3 n=$4 data
  data=$(dataset_file $tag) || exit 1
  mkdir -p runs/$tag/${name}_single
  echo "$(date) start runs/$tag/${name}_single n=$n"
  .venv/bin/hf-knowedit evaluate --config $config --dataset $data --n $n --mode single --fluency-tokens 0 \
     --protocols token_accuracy,prob_comparison --output runs/$tag/${name}_single $EXTRA_ARGS
  rc=$?
  echo "$(date) end runs/$tag/${name}_single rc=$rc"
}
ALL="ike:editing_configs/ike/counterfact.json grace:editing_configs/grace/default.json serac:editing_configs/serac/llama.json rome:editing_configs/rome/llama.json memit:editing_configs/memit/llama.json alphaedit:editing_configs/alphaedit/llama.json kn:editing_configs/kn/llama.json tpatcher:editing_configs/tpatcher/default.json calinet:editing_configs/calinet/default.json mend:editing_configs/mend/llama.json ke:editing_configs/ke/llama.json"
while [ -n "$WAIT" ] && kill -0 $WAIT 2>/dev/null; do sleep 5; done
for n in ${SIZES:-40 200}; do
  for spec in ${METHODS:-$ALL}; do
    IFS=: read name config <<< "$spec"
    case $name in mend|ke|serac)  # a learned method: its editor first
      [ -f runs/$name-smollm2/editor/editor_weights.safetensors ] || METHODS=$name benchmarks/results/train_editors.sh ;;
    esac
    for tag in ${DATASETS:-counterfact zsre}; do run $name $config $tag $n; done
  done
done
echo "$(date) queue done"
