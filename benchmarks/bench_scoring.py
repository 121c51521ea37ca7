"""Benchmark: batched scoring (`hf_knowedit.scoring.BatchScorer`) against scoring one prompt at a time.

The workload is what the evaluation harness computes, with its defaults, for CounterFact cases: for each case,
teacher-forced scores of `target_new` and `target_true` after the edit prompt and its paraphrase, of the locality
answer and of `target_new` after the locality prompt (token accuracy, probability comparison); short greedy
continuations of the three prompts (exact match); and a longer greedy continuation of the edit prompt (fluency). Both
runs use the same code, the only difference being `batch_size`; the outputs are checked to agree.

    OMP_NUM_THREADS=1 python benchmarks/bench_scoring.py --cases 32 --batch-size 32
"""

import argparse
import time

import torch
from paths import COUNTERFACT  # noqa: E402  (sets the benchmarks' environment first)

from hf_knowedit import load_default_model, load_edit_dataset
from hf_knowedit.scoring import BatchScorer


def workload(requests):
    prompts, targets, gen_prompts = [], [], []
    for r in requests:
        for prompt in [r.filled_prompt, *r.rephrase_prompts]:
            prompts += [prompt, prompt]
            targets += [r.target_new, r.target_true]
            gen_prompts.append(prompt)
        for probe in r.locality:
            prompts += [probe.prompt, probe.prompt]
            targets += [probe.answers[0], r.target_new]
            gen_prompts.append(probe.prompt)
    return prompts, targets, gen_prompts


def run(scorer, prompts, targets, gen_prompts, new_tokens, fluency_prompts, fluency_tokens):
    times = [time.perf_counter()]
    scores = scorer.score_targets(prompts, targets)
    times.append(time.perf_counter())
    generations = scorer.generate(gen_prompts, max_new_tokens=new_tokens)
    times.append(time.perf_counter())
    if fluency_tokens:
        generations += scorer.generate(fluency_prompts, max_new_tokens=fluency_tokens)
    times.append(time.perf_counter())
    return scores, generations, [b - a for a, b in zip(times, times[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(COUNTERFACT))
    parser.add_argument("--cases", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=5, help="greedy tokens per generation (exact match)")
    parser.add_argument("--fluency-tokens", type=int, default=50, help="greedy tokens for fluency (harness default)")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model, tokenizer = load_default_model()
    requests = load_edit_dataset(args.dataset, n=args.cases)
    prompts, targets, gen_prompts = workload(requests)
    fluency_prompts = [r.filled_prompt for r in requests]
    print(f"model {model.config._name_or_path}, torch threads {torch.get_num_threads()}, {len(requests)} cases: "
          f"{len(prompts)} teacher-forced targets, {len(gen_prompts)} generations of {args.new_tokens} tokens, "
          f"{len(fluency_prompts)} of {args.fluency_tokens} tokens")

    work = (prompts, targets, gen_prompts, args.new_tokens, fluency_prompts, args.fluency_tokens)
    run(BatchScorer(model, tokenizer, batch_size=args.batch_size), prompts[:8], targets[:8], gen_prompts[:4], 2,
        [], 0)  # warm-up
    one = run(BatchScorer(model, tokenizer, batch_size=1), *work)
    many = run(BatchScorer(model, tokenizer, batch_size=args.batch_size), *work)

    agree_tokens = sum(a.predicted_ids == b.predicted_ids for a, b in zip(one[0], many[0])) / len(one[0])
    max_logp_diff = max(abs(a.mean_log_prob - b.mean_log_prob) for a, b in zip(one[0], many[0]))
    agree_gen = sum(a == b for a, b in zip(one[1], many[1])) / len(one[1])
    print(f"{'':24}{'teacher-forced s':>18}{'exact-match gen s':>19}{'fluency gen s':>15}{'total s':>10}")
    for name, (_, _, seconds) in (("one prompt at a time", one), (f"batched ({args.batch_size})", many)):
        print(f"{name:24}{seconds[0]:18.2f}{seconds[1]:19.2f}{seconds[2]:15.2f}{sum(seconds):10.2f}")
    ratios = [a / b if b else float("nan") for a, b in zip(one[2], many[2])]
    print(f"speed-up: teacher-forced {ratios[0]:.1f}x, exact-match generation {ratios[1]:.1f}x, fluency generation "
          f"{ratios[2]:.1f}x, total {sum(one[2]) / sum(many[2]):.1f}x")
    print(f"agreement: argmax tokens {agree_tokens:.3f}, generations {agree_gen:.3f}, "
          f"max |mean log-prob difference| {max_logp_diff:.2e}")


if __name__ == "__main__":
    main()
