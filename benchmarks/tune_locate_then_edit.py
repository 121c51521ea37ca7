"""Compare config variants of MEMIT or AlphaEdit on CounterFact records outside the benchmark's (by default 300-319).

Each variant overrides fields of `editing_configs/<method>/<family>.json`. One batch of the records is edited and
scored by ROME's CounterFact protocol (efficacy, paraphrase, neighbourhood; see bench_locate_then_edit.py), then the
edit is removed. The target values are optimised once per distinct (`v_lr`, `clamp_norm_factor`,
`v_num_grad_steps`); variants that differ only in how the closed form is solved reuse them, so a sweep of the solve's
regularisation costs one value optimisation.

    python benchmarks/tune_locate_then_edit.py --method memit \\
        --variants '[{}, {"mom2_update_weight": 3000}, {"mom2_update_weight": 1000}, {"mom2_update_weight": 500}]'
    python benchmarks/tune_locate_then_edit.py --method alphaedit --variants '[{}, {"v_lr": 0.5}]'
"""

import argparse
import json
import time

import torch
from bench_locate_then_edit import means, score
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["memit", "alphaedit"], required=True)
    parser.add_argument("--variants", default="[{}]", help="JSON list of config overrides, one edit per entry")
    parser.add_argument("--offset", type=int, default=300)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import hf_knowedit.locate.spread as spread
    from hf_knowedit import EditConfig, EditedModel, load_default_model
    from hf_knowedit.data import load_edit_dataset

    optimize = spread.optimize_target_values
    cache = {}

    def cached_values(edited_model, requests, layer, prefixes, config, site="mlp_out"):
        key = (tuple(r.filled_prompt for r in requests), layer, config.v_lr, config.clamp_norm_factor,
               config.v_num_grad_steps)
        if key not in cache:
            start = time.perf_counter()
            cache[key] = optimize(edited_model, requests, layer, prefixes, config, site)
            print(f"values: {time.perf_counter() - start:.0f} s, {cache[key][2]}", flush=True)
        return cache[key]

    spread.optimize_target_values = cached_values
    model, tokenizer = load_default_model()
    records = load_edit_dataset(COUNTERFACT, n=args.n, offset=args.offset)
    edited = EditedModel(model, tokenizer)
    print(f"records {args.offset}-{args.offset + args.n - 1}, unedited {means(score(model, tokenizer, records))}",
          flush=True)
    base = json.loads((ROOT / "editing_configs" / args.method / f"{model.config.model_type}.json").read_text())
    for overrides in json.loads(args.variants):
        config = EditConfig.from_dict({**base, **overrides})
        start = time.perf_counter()
        edited.add_edits(config, records, edit_name="variant")
        scores = means(score(edited, tokenizer, records))
        edited.delete_edit("variant")
        print(f"{args.method} {json.dumps(overrides)}: {scores} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
