"""Quick figures of the side-memory editors (GRACE, T-Patcher, CaliNET, IKE, SERAC) on the default model, CounterFact.

Per method: seconds per edit, artifact bytes, and, by probability comparison (mean log-probability per target token,
ROME's CounterFact protocol), efficacy P(new) > P(true) on the edit prompt, paraphrase the same on the rephrased
prompt, neighbourhood P(true) > P(new) on the locality prompt. Each record is edited alone and the edit is deleted
before the next. For T-Patcher, also its value scale (`stats["tpatcher_value_scale"]`, smallest and largest over the
edits), its score on the edit prompt in units of its key and its gain (median and largest over the edits; see
`tpatcher_gain`); `tpatcher_memory` is T-Patcher with the paper's memory set (64 train-split records), and its variants
`tpatcher_memory_topk` (memory hinge over the 32 closest memory inputs), `tpatcher_memory_cap` (value scale capped
at 4) and `tpatcher_memory_topk_cap` (both).

    python benchmarks/bench_side_memory.py --n 10

`--ike-scoring N` instead scores the edit and paraphrase prompts of N records under one IKE edit of all of them (16
demonstrations each) in padded batches three ways: each context run once per batch for the prompts that share it
(what `EditedModel` does), each prompt with its own copy of its context, and that with logits at every position of
the routed rows (the contexts' too): seconds, peak tensor memory, speed-ups and the largest difference of the scores.

`--tpatcher-memory-reuse N` instead times N sequential T-Patcher edits with the paper's memory set (64 train-split
records): the memory prompts' FFN inputs reused from the first edit, against recomputed at every edit.

SERAC needs a trained scope classifier (`serac_untrained` is the identity baseline):

    hf-knowedit train-editor --method serac --dataset counterfact-train.json --output runs/serac-smollm2 --max-minutes 5
    python benchmarks/bench_side_memory.py --methods serac,serac_untrained --serac-editor runs/serac-smollm2
"""

import argparse
import contextlib
import json
import tempfile
import time

import torch
from paths import COUNTERFACT, COUNTERFACT_TRAIN, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def mean_log_prob(model, tokenizer, prompt, target):
    from hf_knowedit.tokenization import encode_prompt_target

    batch = encode_prompt_target(tokenizer, [prompt], [target], model=model)
    with torch.no_grad():
        return batch.target_log_probs(model(**batch.model_inputs()).logits).item()


def tpatcher_gain(edited, request):
    """The patch's score on its edit prompt in units of its key (`x·k + b` over `|k| |x|`) and its gain `|v| |k| |x|`:
    how far the model's FFN output moves per unit of score, on the edit prompt or on any prompt past the threshold."""
    from hf_knowedit.methods.tpatcher.editor import TPatcherEditor

    [(path, [patch])] = edited.get_edit("bench").components.items()
    x = TPatcherEditor.ffn_inputs(edited, path, [request.filled_prompt], "cpu")[-1]
    unit = float(patch.keys[0].norm() * x.norm())
    return float(patch.scores(x)[0]) / unit, float(patch.values[0].norm()) * unit


def tpatcher_memory_reuse(edited, config, requests):
    """Seconds per sequential T-Patcher edit with the memory set's FFN inputs reused, and recomputed at every edit."""
    from hf_knowedit.methods.tpatcher import editor as tpatcher_editor

    seconds = {}
    for mode in ("recomputed", "reused"):
        tpatcher_editor._FIXED_MEMORY_INPUTS.clear()
        times = []
        for request in requests:
            if mode == "recomputed":
                tpatcher_editor._FIXED_MEMORY_INPUTS.clear()
            start = time.perf_counter()
            edited.add_edits(config, [request], edit_name="bench")
            times.append(time.perf_counter() - start)
        edited.delete_edit("bench")
        seconds[mode] = sum(times[1:]) / len(times[1:])  # the first edit computes the inputs in both modes
    print(f"tpatcher memory set, {len(requests)} sequential edits: s/edit after the first: recomputed "
          f"{seconds['recomputed']:.2f}, reused {seconds['reused']:.2f} "
          f"(x{seconds['recomputed'] / seconds['reused']:.1f})", flush=True)


def ike_scoring(edited, requests, paraphrases, scorer_batch_size):
    """Time the scoring of routed prompts three ways: each context run once per batch for the prompts that share it
    (what `EditedModel` does), each prompt run with its own copy of its context, and that with logits everywhere."""
    from unittest import mock

    from hf_knowedit import EditedModel
    from hf_knowedit.memory import track_memory
    from hf_knowedit.methods.ike import IKEConfig
    from hf_knowedit.scoring import BatchScorer

    edited.add_edits(IKEConfig(demonstrations_file=str(COUNTERFACT_TRAIN), num_demonstrations=16), requests,
                     edit_name="bench")
    prompts = [r.filled_prompt for r in requests] + paraphrases
    targets = [r.target_new for r in requests] * 2
    scorer = BatchScorer(edited, edited.tokenizer, batch_size=scorer_batch_size)
    variants = {
        "shared contexts": [],
        "a context per prompt": [mock.patch.object(EditedModel, "_shared_context_logits", return_value=None)],
        "a context per prompt, logits everywhere": [
            mock.patch.object(EditedModel, "_shared_context_logits", return_value=None),
            mock.patch.object(EditedModel, "_prompt_positions", return_value=None)],
    }
    figures, scores = {}, {}
    for variant in list(variants) * 2:
        with contextlib.ExitStack() as stack:
            for patch in variants[variant]:
                stack.enter_context(patch)
            measured = stack.enter_context(track_memory())
            start = time.perf_counter()
            scores[variant] = scorer.score_targets(prompts, targets)
            seconds = time.perf_counter() - start
        best = figures.get(variant, (float("inf"), 0))
        figures[variant] = (min(best[0], seconds), max(best[1], measured.peak_tensor_bytes))
    edited.delete_edit("bench")
    print(f"IKE scoring, {len(prompts)} routed prompts (an edit prompt and a paraphrase per fact), batches of "
          f"{scorer_batch_size}, best of 2 runs each:")
    slowest = figures["a context per prompt, logits everywhere"][0]
    reference = scores["a context per prompt, logits everywhere"]
    for variant, (seconds, peak) in figures.items():
        same = all(a.predicted_ids == b.predicted_ids for a, b in zip(scores[variant], reference))
        diff = max(abs(a.mean_log_prob - b.mean_log_prob) for a, b in zip(scores[variant], reference))
        print(f"  {variant:42s} {seconds:6.1f} s ({slowest / seconds:.2f}x)  peak tensors {peak / 1e9:.2f} GB  "
              f"same predictions: {same}, largest log-prob difference {diff:.1e}")


def main():
    from hf_knowedit import EditedModel, EditRequest, load_default_model
    from hf_knowedit.methods.calinet import CaliNETConfig
    from hf_knowedit.methods.grace import GRACEConfig
    from hf_knowedit.methods.ike import IKEConfig
    from hf_knowedit.methods.serac import SERACConfig
    from hf_knowedit.methods.tpatcher import TPatcherConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--methods", default="grace,tpatcher,calinet,ike")
    parser.add_argument("--tpatcher-memory-reuse", type=int, default=0, metavar="N",
                        help="Only time N (>= 2) sequential T-Patcher edits with the memory set, reused or recomputed.")
    parser.add_argument("--serac-editor", default=str(ROOT / "runs" / "serac-smollm2"),
                        help="SERAC's trained scope classifier (hf-knowedit train-editor --method serac --output DIR).")
    parser.add_argument("--ike-scoring", type=int, default=0, metavar="N",
                        help="Only time the scoring of N records' edit and paraphrase prompts under an IKE edit, "
                             "logits at the prompts' positions against at every position.")
    parser.add_argument("--scorer-batch-size", type=int, default=16)
    args = parser.parse_args()
    memory_set = dict(memory_file=str(COUNTERFACT_TRAIN), memory_records=64)
    configs = {
        "grace": GRACEConfig(),
        "tpatcher": TPatcherConfig(),
        "tpatcher_memory": TPatcherConfig(**memory_set),
        "tpatcher_memory_topk": TPatcherConfig(**memory_set, memory_top_k=32),
        "tpatcher_memory_cap": TPatcherConfig(**memory_set, max_value_scale=4),
        "tpatcher_memory_topk_cap": TPatcherConfig(**memory_set, memory_top_k=32, max_value_scale=4),
        "calinet": CaliNETConfig(),
        "ike": IKEConfig(demonstrations_file=str(COUNTERFACT_TRAIN), num_demonstrations=8),
        "serac": SERACConfig(editor=args.serac_editor),
        "serac_untrained": SERACConfig(editor="untrained"),
    }
    records = json.loads((COUNTERFACT).read_text())[: args.n]
    requests = [EditRequest(prompt=r["prompt"], subject=r["subject"], target_new=r["target_new"],
                            target_true=r["ground_truth"]) for r in records]
    model, tokenizer = load_default_model()
    edited = EditedModel(model, tokenizer)
    if args.ike_scoring:
        if args.ike_scoring > len(requests):
            parser.error("--ike-scoring needs N <= --n.")
        paraphrases = [r["rephrase_prompt"] for r in records[: args.ike_scoring]]
        ike_scoring(edited, requests[: args.ike_scoring], paraphrases, args.scorer_batch_size)
        return
    if args.tpatcher_memory_reuse:
        if args.tpatcher_memory_reuse < 2 or args.tpatcher_memory_reuse > len(requests):
            parser.error("--tpatcher-memory-reuse needs 2 <= N <= --n.")
        tpatcher_memory_reuse(edited, configs["tpatcher_memory"], requests[: args.tpatcher_memory_reuse])
        return
    for method in args.methods.split(","):
        scores = {"efficacy": [], "paraphrase": [], "neighbourhood": []}
        seconds, sizes, value_scales, gains = [], [], [], []
        for record, request in zip(records, requests, strict=True):
            start = time.perf_counter()
            edited.add_edits(configs[method], [request], edit_name="bench")
            seconds.append(time.perf_counter() - start)
            value_scales.append(edited.get_edit("bench").stats.get("tpatcher_value_scale"))
            if method.startswith("tpatcher"):
                gains.append(tpatcher_gain(edited, request))
            with tempfile.TemporaryDirectory() as tmp:
                sizes.append(edited.save_pretrained(tmp)["bench"])
            new, true = request.target_new, request.target_true
            for key, prompt, good, bad in (("efficacy", request.filled_prompt, new, true),
                                           ("paraphrase", record["rephrase_prompt"], new, true),
                                           ("neighbourhood", record["locality_prompt"], true, new)):
                scores[key].append(mean_log_prob(edited, tokenizer, prompt, good)
                                   > mean_log_prob(edited, tokenizer, prompt, bad))
            edited.delete_edit("bench")
        figures = {k: round(sum(v) / len(v), 3) for k, v in scores.items()}
        print(f"{method:15s} n={len(records)} edit_s={sum(seconds) / len(seconds):.2f} "
              f"artifact_bytes={int(sum(sizes) / len(sizes))} {figures}"
              + (f" value_scale={min(value_scales):.1f}..{max(value_scales):.1f}" if None not in value_scales else "")
              + (" edit_score={:.3f} gain={:.0f} (max {:.0f})".format(
                  *torch.tensor(gains).median(0).values.tolist(), max(g[1] for g in gains)) if gains else ""),
              flush=True)
    with edited.disable_edits():
        base = {"efficacy": [], "paraphrase": [], "neighbourhood": []}
        for record, request in zip(records, requests, strict=True):
            new, true = request.target_new, request.target_true
            base["efficacy"].append(mean_log_prob(edited, tokenizer, request.filled_prompt, new)
                                    > mean_log_prob(edited, tokenizer, request.filled_prompt, true))
            base["paraphrase"].append(mean_log_prob(edited, tokenizer, record["rephrase_prompt"], new)
                                      > mean_log_prob(edited, tokenizer, record["rephrase_prompt"], true))
            base["neighbourhood"].append(mean_log_prob(edited, tokenizer, record["locality_prompt"], true)
                                         > mean_log_prob(edited, tokenizer, record["locality_prompt"], new))
        print(f"{'unedited':15s} n={len(records)} {({k: round(sum(v) / len(v), 3) for k, v in base.items()})}")


if __name__ == "__main__":
    main()
