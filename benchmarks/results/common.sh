# Sourced by the results scripts: the environment of every run (one thread, offline, data and statistics corpus from
# ../shared/data) and the dataset file of a tag.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_KNOWEDIT_DISABLE_PROGRESS_BARS=1
export HF_KNOWEDIT_DATA_DIR=../shared/data HF_KNOWEDIT_STATS_CORPUS=../shared/data/wikitext
dataset_file() {  # dataset_file counterfact|zsre
  case $1 in
    counterfact) echo ../shared/data/counterfact_easyedit/counterfact-edit.json ;;
    zsre) echo ../shared/data/knowedit/ZsRE-test-all.json ;;
    *) echo "unknown dataset tag $1 (counterfact or zsre)" >&2; return 1 ;;
  esac
}
