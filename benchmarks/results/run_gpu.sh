#!/bin/bash
# GPU figures for docs/results.md: the same evaluations as the CPU runs, on one GPU (the harness puts the model on the
# first GPU when one is visible and records torch.cuda.max_memory_allocated as the peak memory).
# Usage: [N=20] [HFKE=".venv/bin/hf-knowedit"] [GPU_RUNS=runs/gpu] benchmarks/results/run_gpu.sh STEP...
#   single       every method whose editor is at hand, N single CounterFact edits each (fp32)
#   bf16         ROME, MEMIT and FT-M again with the model loaded in bfloat16
#   batch        MEMIT and AlphaEdit: the first B CounterFact cases edited in one batch, for B in GPU_BATCHES
#                (default "100 1000"); BATCH_METHODS="memit alphaedit" by default
# Outputs: $GPU_RUNS/counterfact/<name>_<mode>; every run resumes like the CPU ones. MEND and KE run only where their trained
# editors (runs/mend-smollm2, runs/ke-smollm2) exist.
source "$(dirname "$0")/common.sh"
export OMP_NUM_THREADS=${GPU_OMP_THREADS:-8}
N=${N:-20}
GPU_RUNS=${GPU_RUNS:-runs/gpu}
HFKE=${HFKE:-.venv/bin/hf-knowedit}
DATA=$(dataset_file counterfact) || exit 1
SINGLE=${SINGLE:-"rome:editing_configs/rome/llama.json memit:editing_configs/memit/llama.json
alphaedit:editing_configs/alphaedit/llama.json ft_m:ft:ft_m ft_l:ft:ft_l kn:kn: grace:editing_configs/grace/default.json
tpatcher:editing_configs/tpatcher/default.json calinet:editing_configs/calinet/default.json
ike:editing_configs/ike/counterfact.json serac:editing_configs/serac/llama.json"}
[ -f runs/mend-smollm2/editor/editor_weights.safetensors ] && SINGLE="$SINGLE mend:editing_configs/mend/llama.json"
[ -f runs/ke-smollm2/editor/editor_weights.safetensors ] && SINGLE="$SINGLE ke:editing_configs/ke/llama.json"
evaluate() {  # evaluate NAME SPEC OUTPUT_SUFFIX ARGS...: SPEC is a config file, or method:variant (variant may be empty)
  local name=$1 spec=$2 suffix=$3 method variant
  shift 3
  IFS=: read method variant <<< "$spec"
  if [ -f "$spec" ]; then set -- --config "$spec" "$@"
  elif [ -n "$variant" ]; then set -- --method $method --set variant=$variant "$@"
  else set -- --method $method "$@"; fi
  mkdir -p $GPU_RUNS/counterfact/${name}_$suffix
  echo "$(date) start $GPU_RUNS/counterfact/${name}_$suffix"
  $HFKE evaluate "$@" --dataset $DATA --fluency-tokens 0 --protocols token_accuracy,prob_comparison \
    --output $GPU_RUNS/counterfact/${name}_$suffix
  echo "$(date) end $GPU_RUNS/counterfact/${name}_$suffix rc=$?"
}
for step in "$@"; do
  case $step in
    single) for s in $SINGLE; do IFS=: read name rest <<< "$s"; evaluate $name "$rest" single --n $N --mode single; done ;;
    bf16) for s in rome:editing_configs/rome/llama.json memit:editing_configs/memit/llama.json ft_m:ft:ft_m; do
            IFS=: read name rest <<< "$s"; evaluate $name "$rest" single_bf16 --n $N --mode single --dtype bfloat16
          done ;;
    batch) for b in ${GPU_BATCHES:-100 1000}; do
             for name in ${BATCH_METHODS:-memit alphaedit}; do
               evaluate $name editing_configs/$name/llama.json batch$b --n $b --mode batch --batch-size $b
             done
           done ;;
    *) echo "unknown step $step (single, bf16, batch)" >&2; exit 2 ;;
  esac
done
