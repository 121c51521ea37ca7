#!/bin/bash
# Sequential-editing runs for docs/results.md: each method applies N edits one after another on the default model
# (nothing undone between them) and is scored on every case edited so far after every K edits (SCHEDULE=every:K),
# the last checkpoint being the scores after all N.
# Usage: [N=500] [SCHEDULE=every:100] [PROTOCOLS=token_accuracy,prob_comparison] [DATASETS="counterfact zsre"] [METHODS="name:config ..."] [WAIT=pid]
#        benchmarks/results/run_sequential.sh
# Outputs: runs/<dataset>/<name>_sequential<N>; a run stopped part-way resumes from the snapshot of its last checkpoint
# (runs/.../snapshots/, kept in git while the stream is not complete, so that another checkout goes on from it).
source "$(dirname "$0")/common.sh"
N=${N:-500}
SIDE_MEMORY="serac:editing_configs/serac/llama.json ike:editing_configs/ike/counterfact.json calinet:editing_configs/calinet/default.json grace:editing_configs/grace/default.json tpatcher:editing_configs/tpatcher/default.json"
while [ -n "$WAIT" ] && kill -0 $WAIT 2>/dev/null; do sleep 5; done
for spec in ${METHODS:-$SIDE_MEMORY}; do
  IFS=: read name config <<< "$spec"
  for tag in ${DATASETS:-counterfact zsre}; do
    data=$(dataset_file $tag) || exit 1
    out=runs/$tag/${name}_sequential$N
    mkdir -p $out
    echo "$(date) start $out"
    .venv/bin/hf-knowedit evaluate --config $config --dataset $data --n $N --mode sequential \
      --eval-schedule ${SCHEDULE:-every:100} --fluency-tokens 0 --protocols ${PROTOCOLS:-token_accuracy,prob_comparison} --output $out
    rc=$?
    echo "$(date) end $out rc=$rc"
  done
done
echo "$(date) sequential queue done"
