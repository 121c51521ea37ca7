#!/bin/bash
# Fluency runs of docs/results.md ("Fluency" section): the first 25 CounterFact cases, single edits, 50 tokens generated
# greedily from each edit prompt after the edit, token accuracy for reliability; under runs/fluency/counterfact/.
# Usage: [METHODS="name:config ..."] benchmarks/results/run_fluency.sh
# The learned editors (MEND, KE, SERAC) are trained first when missing (benchmarks/results/train_editors.sh).
source "$(dirname "$0")/common.sh"
ALL="ike:editing_configs/ike/counterfact.json grace:editing_configs/grace/default.json calinet:editing_configs/calinet/default.json tpatcher:editing_configs/tpatcher/default.json serac:editing_configs/serac/llama.json mend:editing_configs/mend/llama.json ke:editing_configs/ke/llama.json ft_m:editing_configs/ft/ft_m.json rome:editing_configs/rome/llama.json memit:editing_configs/memit/llama.json alphaedit:editing_configs/alphaedit/llama.json kn:editing_configs/kn/llama.json"
data=$(dataset_file counterfact) || exit 1
for spec in ${METHODS:-$ALL}; do
  IFS=: read name config <<< "$spec"
  case $name in mend|ke|serac)  # a learned method: its editor first
    [ -f runs/$name-smollm2/editor/editor_weights.safetensors ] || METHODS=$name benchmarks/results/train_editors.sh ;;
  esac
  out=runs/fluency/counterfact/${name}_single
  mkdir -p $out
  echo "$(date) start $out"
  .venv/bin/hf-knowedit evaluate --config $config --dataset $data --n 25 --mode single --fluency-tokens 50 \
     --protocols token_accuracy --output $out
  echo "$(date) end $out rc=$?"
done
echo "$(date) queue done"
