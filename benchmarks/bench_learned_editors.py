"""Benchmark KN, MEND and KE on the default model (SmolLM2-135M-Instruct) with CounterFact single edits.

Each edit is made on its own (undone before the next) and scored by probability comparison (mean log-probability per
target token), as in ROME's CounterFact protocol: efficacy `P(new) > P(true)` on the edit prompt, paraphrase the same
on the rephrased prompt, neighbourhood `P(true) > P(new)` on the locality prompt with its own answer as `true`; plus
the mean gain of `log P(new)` on the edit prompt, and seconds per edit.

MEND and KE need trained editors (`--mend-editor`, `--ke-editor`: an `hf-knowedit train-editor` output folder);
`untrained` benchmarks the untrained networks as baselines.

    python benchmarks/bench_learned_editors.py --n 20 --methods kn mend ke \
        --mend-editor runs/mend-smollm2 --ke-editor runs/ke-smollm2
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from paths import COUNTERFACT  # noqa: E402  (sets the benchmarks' environment first)


def mean_log_prob(model, tokenizer, prompt: str, target: str) -> float:
    from hf_knowedit.tokenization import encode_prompt_target

    batch = encode_prompt_target(tokenizer, [prompt], [target], model=model)
    with torch.no_grad():
        return float(batch.target_log_probs(model(**batch.model_inputs()).logits)[0])


def score(model, tokenizer, request) -> dict:
    new, true = request.target_new, request.target_true
    result = {"edit_log_prob": mean_log_prob(model, tokenizer, request.filled_prompt, new)}
    result["efficacy"] = float(result["edit_log_prob"] > mean_log_prob(model, tokenizer, request.filled_prompt, true))
    if request.rephrase_prompts:
        prompt = request.rephrase_prompts[0]
        result["paraphrase"] = float(mean_log_prob(model, tokenizer, prompt, new)
                                     > mean_log_prob(model, tokenizer, prompt, true))
    if request.locality and request.locality[0].answers:
        probe = request.locality[0]
        result["neighbourhood"] = float(mean_log_prob(model, tokenizer, probe.prompt, probe.answers[0])
                                        > mean_log_prob(model, tokenizer, probe.prompt, new))
    return result


def config_for(method: str, args):
    from hf_knowedit.methods.ke import KEConfig
    from hf_knowedit.methods.kn import KNConfig
    from hf_knowedit.methods.mend import MENDConfig

    if method == "kn":
        return KNConfig(layers=args.kn_layers)
    if method == "mend":
        return MENDConfig(editor=args.mend_editor)
    return KEConfig(editor=args.ke_editor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["kn", "mend", "ke"], choices=["kn", "mend", "ke"])
    parser.add_argument("--mend-editor", default="untrained")
    parser.add_argument("--ke-editor", default="untrained")
    parser.add_argument("--kn-layers", type=int, nargs="*", default=None, help="KN's layers (default: all).")
    parser.add_argument("--output", type=Path, default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from hf_knowedit import EditedModel, load_default_model, load_edit_dataset

    model, tokenizer = load_default_model()
    requests = load_edit_dataset(COUNTERFACT, n=args.n)
    base = [score(model, tokenizer, r) for r in requests]
    results = {}
    for method in args.methods:
        config = config_for(method, args)
        rows, seconds = [], []
        for request, before in zip(requests, base):
            edited = EditedModel(model, tokenizer)
            start = time.perf_counter()
            edited.add_edits(config, [request])
            seconds.append(time.perf_counter() - start)
            after = score(edited, tokenizer, request)
            after["log_prob_gain"] = after["edit_log_prob"] - before["edit_log_prob"]
            rows.append(after)
            edited.unload()
        keys = sorted({k for row in rows for k in row if k != "edit_log_prob"})
        results[method] = {k: sum(r[k] for r in rows if k in r) / max(1, sum(k in r for r in rows)) for k in keys}
        results[method].update(seconds_per_edit=sum(seconds) / len(seconds), n=len(rows),
                               editor=getattr(config, "editor", None))
        print(method, json.dumps(results[method], sort_keys=True), flush=True)
    results["unedited"] = {k: sum(r[k] for r in base if k in r) / len(base) for k in ("efficacy", "neighbourhood")}
    print("unedited", json.dumps(results["unedited"], sort_keys=True))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
