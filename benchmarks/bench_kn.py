"""KN's attribution on the default model: layers batched in one pass against one pass per layer.

For each of the first --n CounterFact requests, the request's knowledge neurons (`KNEditor.knowledge_neurons`: the
integrated gradients of the edit prompt and its rephrase, at every layer, `editing_configs/kn/llama.json`) are
computed in the same process for each `layers_per_pass` of --layers-per-pass, alternating the order: by default
8 (the config's default: 8 layers in one batch of 20 x 8 copies) and `1` (the way KN ran before: a forward and
backward pass per layer, the reference).
Prints the seconds of each, their ratio, whether the selected neurons are the same, the largest difference of the
attributions of the edit prompts, and the tensor peak of each on the first request (`hf_knowedit.memory.track_memory`,
measured apart from the timed calls).

    python benchmarks/bench_kn.py --n 5
    python benchmarks/bench_kn.py --n 2 --layers-per-pass all,10,8,1
    python benchmarks/bench_kn.py --n 1 --layers-per-pass 8,1 --edit DIR  # after a stream's edits (DIR: e.g. the
        # snapshot at 400 of KN's CounterFact stream, in git history: `git archive 9f14d2c~1
        # runs/counterfact/kn_sequential500/snapshots/at-400 | tar -x -C /tmp`, then DIR=/tmp/runs/counterfact/
        # kn_sequential500/snapshots/at-400/edit/evaluation)
"""

import argparse
import dataclasses
import statistics
import time

import torch
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="CounterFact requests.")
    parser.add_argument("--config", default=str(ROOT / "editing_configs" / "kn" / "llama.json"))
    parser.add_argument("--edit", default=None,
                        help="An edit folder (save_pretrained) to apply first: attribution on an edited model, e.g. "
                             "the snapshot of a KN stream.")
    parser.add_argument("--layers-per-pass", default="8,1",
                        help="Comma-separated values compared ('all' for None); the last must be 1, the reference.")
    args = parser.parse_args()

    from hf_knowedit import EditedModel, load_default_model, load_edit_dataset
    from hf_knowedit.config import build_config
    from hf_knowedit.memory import track_memory
    from hf_knowedit.methods.kn.attribution import integrated_gradients, neuron_activations, prompt_probe
    from hf_knowedit.methods.kn.editor import KNEditor

    model, tokenizer = load_default_model()
    edited = (EditedModel.from_pretrained(model, args.edit, tokenizer=tokenizer) if args.edit
              else EditedModel(model, tokenizer))
    base = build_config("kn", args.config, {})
    layers = base.resolve_layers(edited.layout)
    modules = {layer: edited.layout.mlp_out(model, layer) for layer in layers}
    sizes = [None if size == "all" else int(size) for size in args.layers_per_pass.split(",")]
    if len(sizes) < 2 or sizes[-1] != 1:
        parser.error("--layers-per-pass needs at least two values, the last one 1 (the reference)")
    configs = {f"layers_per_pass={size or 'all'}": dataclasses.replace(base, layers_per_pass=size) for size in sizes}
    seconds = {name: [] for name in configs}
    peaks = {}
    same_neurons, largest_difference = 0, 0.0
    requests = load_edit_dataset(str(COUNTERFACT), n=args.n)
    for number, request in enumerate(requests):
        neurons = {}
        for name in list(configs) if number % 2 == 0 else list(configs)[::-1]:
            start = time.perf_counter()
            neurons[name] = KNEditor(configs[name]).knowledge_neurons(edited, modules, request)["neurons"]
            seconds[name].append(time.perf_counter() - start)
        reference = neurons.pop(list(configs)[-1])
        same_neurons += int(all(torch.equal(found, reference) for found in neurons.values()))
        # the attributions themselves, on the edit prompt
        probe, _ = prompt_probe(model, tokenizer, request.filled_prompt, request.target_new)
        token = prompt_probe(model, tokenizer, request.filled_prompt, request.target_true)[1]
        activations = neuron_activations(model, modules, probe)
        apart = integrated_gradients(model, modules, probe, activations, token, base.steps, 1)
        for size in sizes[:-1]:
            together = integrated_gradients(model, modules, probe, activations, token, base.steps, size)
            largest_difference = max(largest_difference,
                                     *(float((together[k] - apart[k]).abs().max()) for k in modules))

    for name, config in configs.items():  # apart from the timing: the profiler slows small operations most
        with track_memory() as memory:
            KNEditor(config).knowledge_neurons(edited, modules, requests[0])
        peaks[name] = memory.peak_tensor_bytes

    print(f"KN attribution on the default model{' with the edit ' + args.edit if args.edit else ''}, "
          f"{len(requests)} CounterFact requests, {len(layers)} layers, "
          f"{base.steps} steps, torch threads {torch.get_num_threads()}")
    for name in configs:
        print(f"{name:<24} {statistics.median(seconds[name]):7.2f} s per request (median)   "
              f"tensor peak {peaks[name] / 1e6:8.1f} MB (first request)")
    reference = list(configs)[-1]
    for name in list(configs)[:-1]:
        ratio = statistics.median(r / a for a, r in zip(seconds[name], seconds[reference], strict=True))
        print(f"{reference} / {name}: {ratio:.2f}x faster (median of the per-request ratios)")
    print(f"same neurons as {reference} for {same_neurons} of {len(requests)} requests (every setting); largest "
          f"attribution difference {largest_difference:.3g}")


if __name__ == "__main__":
    main()
