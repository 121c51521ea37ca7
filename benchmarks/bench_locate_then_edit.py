"""Benchmark ROME, MEMIT and AlphaEdit on the default model (SmolLM2-135M-Instruct) with CounterFact.

Scores follow ROME's CounterFact protocol by probability comparison (mean log-probability per target token):
efficacy  P(target_new) > P(target_true) on the edit prompt; paraphrase the same on the rephrased prompt;
neighbourhood  P(true) > P(new) on the neighbourhood (locality) prompt, `true` being its own answer;
neighbourhood_kept  the share of neighbourhood prompts whose comparison is the same as on the unedited model (whose
               own neighbourhood score is the most an edit can keep).

Modes: `rome` (single edits, each undone before the next), `memit` (one batch of --n), `alphaedit` (--sequential-n
sequential single edits, all scored at the end), `rome_sequential` (the same with ROME, reported as is).
Timing: seconds per edit split into statistics (one-off, cached), keys, values and solve; the ratio of seconds per
edit to one forward+backward pass of the full model over the same prompts (prefixed prompts + target, KL prompt).

    python benchmarks/bench_locate_then_edit.py --n 20 --methods rome
    python benchmarks/bench_locate_then_edit.py --n 100 --methods memit
"""

import argparse
import json
import os
import resource
import statistics as pystats
import time

import torch
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def mean_log_probs(model, tokenizer, prompts, targets, batch_size=32):
    from hf_knowedit.tokenization import encode_prompt_target

    out = []
    for i in range(0, len(prompts), batch_size):
        batch = encode_prompt_target(tokenizer, prompts[i : i + batch_size], targets[i : i + batch_size], model=model)
        with torch.no_grad():
            out.append(batch.target_log_probs(model(**batch.model_inputs()).logits))
    return torch.cat(out)


def score(model, tokenizer, requests):
    """Efficacy, paraphrase and neighbourhood (probability comparison): 0/1 per prompt, in request order."""
    def compare(prompts, first, second):
        a = mean_log_probs(model, tokenizer, prompts, first)
        b = mean_log_probs(model, tokenizer, prompts, second)
        return (a > b).float()

    rs = [r for r in requests if r.target_true]
    efficacy = compare([r.filled_prompt for r in rs], [r.target_new for r in rs], [r.target_true for r in rs])
    para = [(p, r) for r in rs for p in r.rephrase_prompts[:1]]
    paraphrase = compare([p for p, _ in para], [r.target_new for _, r in para], [r.target_true for _, r in para])
    neigh = [(probe, r) for r in rs for probe in r.locality[:1] if probe.answers]
    neighbourhood = compare([p.prompt for p, _ in neigh], [p.answers[0] for p, _ in neigh],
                            [r.target_new for _, r in neigh])
    return {"efficacy": efficacy, "paraphrase": paraphrase, "neighbourhood": neighbourhood}


def means(vectors: dict) -> dict:
    return {k: round(v.mean().item(), 3) for k, v in vectors.items()}


def forward_backward_seconds(model, tokenizer, request, prefixes, repeats=3):
    """Seconds of one forward+backward pass of the full model over the edit's optimisation prompts."""
    from hf_knowedit.tokenization import encode_prompt_target

    texts = [p + request.filled_prompt for p in prefixes] + [f"{request.subject} is a"]
    batch = encode_prompt_target(tokenizer, texts, [request.target_new] * len(texts), model=model)
    embeddings = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.enable_grad():
            logits = model(inputs_embeds=embeddings, attention_mask=batch.attention_mask).logits
            (-batch.target_log_probs(logits).sum()).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def phase_report(per_edit: list[dict], fb_seconds: float) -> dict:
    phases = ("keys", "values", "solve")
    totals = [sum(s.get(f"{p}_seconds", 0.0) for p in phases) for s in per_edit]
    median = pystats.median(totals)
    share = {p: sum(s.get(f"{p}_seconds", 0.0) for s in per_edit) / max(sum(totals), 1e-9) for p in phases}
    return {"seconds_per_edit_median": round(median, 3),
            "seconds_per_edit_mean": round(sum(totals) / len(totals), 3),
            "share": {p: round(v, 3) for p, v in share.items()},
            "ratio_to_forward_backward": round(median / fb_seconds, 1)}


def load_config(method, family, args):
    from hf_knowedit import EditConfig

    data = json.loads((ROOT / "editing_configs" / method / f"{family}.json").read_text())
    data["mom2_num_tokens"] = args.mom2_num_tokens
    return EditConfig.from_dict(data)


def run(method, args, model, tokenizer, records):
    from hf_knowedit import EditedModel
    from hf_knowedit.locate import context_prefixes

    family = model.config.model_type
    config_name = "rome" if method.startswith("rome") else method
    config = load_config(config_name, family, args)
    edited = EditedModel(model, tokenizer)
    result = {"method": method, "layers": config.resolve_layers(edited.layout)}
    prefixes = context_prefixes(model, tokenizer, config.num_context_prefixes, config.context_prefix_length)
    fb = forward_backward_seconds(model, tokenizer, records[0], prefixes)
    start = time.perf_counter()
    if method == "rome":
        per_edit, scores, sizes = [], [], []
        for request in records:
            edited.add_edits(config, [request], edit_name="e")
            per_edit.append(dict(edited.get_edit("e").stats))
            sizes.append(edited.get_edit("e").num_bytes())
            scores.append(score(edited, tokenizer, [request]))
            edited.delete_edit("e")
        vectors = {k: torch.cat([s[k] for s in scores]) for k in scores[0]}
        result["artifact_bytes_per_edit"] = sizes[0]
    elif method == "memit":
        edited.add_edits(config, records, edit_name="e")
        stats = dict(edited.get_edit("e").stats)
        per_edit = [{k: v / len(records) for k, v in stats.items() if k.endswith("_seconds")}]
        vectors = score(edited, tokenizer, records)
        result["artifact_bytes"] = edited.get_edit("e").num_bytes()
        result["ranks"] = stats.get("ranks")
        edited.delete_edit("e")
    else:  # sequential: alphaedit, rome_sequential
        per_edit = []
        for request in records:
            edited.add_edits(config, [request], edit_name="e")
            # The phase seconds in an edit's stats are those of its latest call (edit_seconds alone accumulates).
            after = edited.get_edit("e").stats
            per_edit.append({k: v for k, v in after.items() if k.endswith("_seconds") and k != "edit_seconds"})
        vectors = score(edited, tokenizer, records)
        result["artifact_bytes"] = edited.get_edit("e").num_bytes()
        edited.delete_edit("e")
    result.update(means(vectors))
    result["vectors"] = vectors
    result["statistics_seconds_one_off"] = round(sum(s.get("statistics_seconds", 0.0) for s in per_edit), 1)
    result["forward_backward_seconds"] = round(fb, 4)
    result.update(phase_report(per_edit, fb))
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss_mb"] = round(peak_rss_mb())
    result["n"] = len(records)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="CounterFact records for rome and memit")
    parser.add_argument("--sequential-n", type=int, default=200, help="records for alphaedit / rome_sequential")
    parser.add_argument("--methods", default="rome,memit,alphaedit,rome_sequential")
    parser.add_argument("--mom2-num-tokens", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hf_knowedit import load_default_model
    from hf_knowedit.data import load_edit_dataset

    model, tokenizer = load_default_model()
    print(f"model {model.config.model_type} layers={model.config.num_hidden_layers} threads={args.threads} "
          f"mom2_num_tokens={args.mom2_num_tokens}", flush=True)
    for method in args.methods.split(","):
        n = args.sequential_n if method in ("alphaedit", "rome_sequential") else args.n
        records = load_edit_dataset(COUNTERFACT, n=n)
        base = score(model, tokenizer, records)
        result = run(method, args, model, tokenizer, records)
        post = result.pop("vectors")
        # The unedited model's own neighbourhood score is the ceiling of an edit that keeps the neighbours as they
        # were; `neighbourhood_kept` is the share of neighbourhood prompts whose comparison the edit left unchanged.
        result["neighbourhood_kept"] = round((post["neighbourhood"] == base["neighbourhood"]).float().mean().item(), 3)
        result["unedited"] = means(base)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
