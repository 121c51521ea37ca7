"""How close `hf-knowedit plan` comes to the measured peak memory of one edit, for every method on the default model.

For each method, the plan (`hf_knowedit.plan.estimate_peak_memory`) is made first, from the method's ready config
(`editing_configs/<method>/llama.json`, else `default.json`, else the defaults) and the token counts of the edited
CounterFact request(s), before the model is loaded. Then the model (SmolLM2-135M-Instruct, CPU) is loaded, and each
method edits it once, on the untouched model, with the in-memory caches of statistics and context prefixes cleared,
so that every edit is a first edit (statistics are read from the disk cache when there, computed otherwise, and the
plan knows which).

What "peak" means on CPU (see `hf_knowedit.memory.track_memory`):

- **tensor peak**: the most tensor memory alive at once during the edit, read from the CPU allocator's events through
  the PyTorch profiler (`profile_memory=True`): the weights and everything else alive when the edit starts, found by
  the garbage collector, plus the peak of the running sum of allocations and frees during the edit. It is exact for
  tensors and free of what `malloc` keeps or returns, so it is what the plan's estimate is compared with ("ratio").
  The part above the weights ("working") is the discriminating figure: the weights alone are 538 MB of a peak of
  540 to 900 MB.
- **RSS**: the process's resident set, measured in separate edit runs made first, before the profiler has ever run
  in the process (its event buffers are resident memory too, and stay with `malloc`): its value when the edit
  starts, and its high-water mark during the edit (Linux resets the mark through `/proc/self/clear_refs`); freed
  memory is handed back to the system (`malloc_trim`) between edits. It includes the Python and torch runtime and
  depends on the allocator, so it is reported, not compared. The weights are paged in by a forward pass before any
  measurement: the converted model is memory-mapped, and a first edit would otherwise count the weights it touches
  as new RSS.

The RSS runs may compute statistics that were not on disk yet; the plans compared with the tensor peaks are made
again just before each measured edit, so that they assume what that edit finds.

MEND, KE and SERAC edit with the editors their ready configs name (`runs/mend-smollm2`, `runs/ke-smollm2`,
`runs/serac-smollm2`) when those exist, else with `editor="untrained"`, whose network has the same shapes and so the
same memory (a config's `editor=None` is refused by MEND and KE); --mend-editor/--ke-editor/--serac-editor name others.

    python benchmarks/bench_plan.py
    python benchmarks/bench_plan.py --methods ft rome memit --n 4 --dtype bfloat16 --output plan.json
    python benchmarks/bench_plan.py --methods calinet --n 12 --set calinet.requests_per_pass=4  # CaliNET's passes
"""

import argparse
import ctypes
import gc
import json
import os
import time
from pathlib import Path

import torch
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


METHODS = ["ft", "rome", "memit", "alphaedit", "kn", "mend", "ke", "serac", "tpatcher", "calinet", "grace", "ike"]
MB = 1e6
GOAL = 0.25  # the goal: the estimate within 25% of the measured peak


def ready_config(method: str, args):
    """The method's ready config, with trained editors that are not on disk replaced by the untrained network."""
    from hf_knowedit.config import build_config
    from hf_knowedit.errors import ArtifactError
    from hf_knowedit.training import editor_directory

    folder = ROOT / "editing_configs" / method
    path = next((folder / name for name in ("llama.json", "default.json") if (folder / name).is_file()), None)
    config = build_config(method, str(path) if path else None, args.overrides.get(method))
    chosen = {"mend": args.mend_editor, "ke": args.ke_editor, "serac": args.serac_editor}.get(method)
    if hasattr(config, "editor"):
        editor = chosen or config.editor
        if editor != "untrained":
            editor = str(ROOT / editor) if (ROOT / editor).exists() else editor
            try:  # a checkout holds an editor's config and training log (in git), its weights once trained here
                editor_directory(editor)
            except ArtifactError:
                print(f"  {method}: editor {editor!r} not trained here; using editor='untrained' (same shapes, same "
                      "memory)")
                editor = "untrained"
        config.editor = editor
    return config, path


def method_overrides(parser, items: list[str], methods: list[str]) -> dict[str, dict]:
    """`--set METHOD.KEY=VALUE` items as {method: {key: value}}, for methods that are measured."""
    from hf_knowedit.utils import parse_overrides

    by_method: dict[str, list[str]] = {}
    for item in items:
        method, dot, rest = item.partition(".")
        if not dot or "=" not in rest or method not in methods:
            parser.error(f"--set expects METHOD.KEY=VALUE with METHOD one of --methods {methods}, got {item!r}")
        by_method.setdefault(method, []).append(rest)
    return {method: parse_overrides(rest, example=f"{method}.num_steps=10") for method, rest in by_method.items()}


def clear_caches() -> None:
    from hf_knowedit.locate import keys
    from hf_knowedit.statistics import clear_statistics_cache

    clear_statistics_cache()
    keys._PREFIX_CACHE.clear()
    gc.collect()
    try:  # give freed memory back to the system, so that each edit's RSS starts from what is in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def edit_once(model, tokenizer, config, requests, tensors: bool):
    from hf_knowedit import EditedModel
    from hf_knowedit.memory import track_memory

    clear_caches()
    edited = EditedModel(model, tokenizer)
    start = time.perf_counter()
    with track_memory(tensors=tensors) as measured:
        edited.add_edits(config, requests)
    seconds = time.perf_counter() - start
    model = edited.unload()
    del edited
    gc.collect()
    return model, measured, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--n", type=int, default=1, help="CounterFact requests edited at once (default: 1).")
    parser.add_argument("--offset", type=int, default=0, help="Index of the first CounterFact request.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--mend-editor", default=None, help="Trained MEND editor (default: its ready config's).")
    parser.add_argument("--ke-editor", default=None, help="Trained KE editor (default: its ready config's).")
    parser.add_argument("--serac-editor", default=None, help="Trained SERAC classifier (default: its config's).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="Override a field of a method's ready config; VALUE is read as JSON, else as a string "
                        "(--set calinet.requests_per_pass=4).")
    parser.add_argument("--no-rss", action="store_true", help="Skip the second, profiler-free run for RSS.")
    parser.add_argument("--output", type=Path, default=None, help="Write the figures as JSON here.")
    args = parser.parse_args()
    args.overrides = method_overrides(parser, args.overrides, args.methods)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from hf_knowedit import load_default_model, load_edit_dataset
    from hf_knowedit.plan import estimate_peak_memory

    requests = load_edit_dataset(COUNTERFACT, n=args.n, offset=args.offset)
    print(f"{len(requests)} request(s) per edit, from {COUNTERFACT.name} at offset {args.offset}: "
          f"{requests[0].filled_prompt!r} -> {requests[0].target_new!r}; model in {args.dtype}"
          + "".join(f"; {method} with {fields}" for method, fields in args.overrides.items()))

    # 1. The plans, before any weight is loaded.
    configs, plans = {}, {}
    start = time.perf_counter()
    for method in args.methods:
        configs[method], _ = ready_config(method, args)
        plans[method] = estimate_peak_memory(configs[method], "default", requests=requests, batch_size=len(requests),
                                             dtype=args.dtype)
    print(f"Planned {len(plans)} method(s) in {time.perf_counter() - start:.1f} s without loading the model.\n")

    # 2. The measurements: RSS first (no profiler yet in this process), then the tensor peaks.
    model, tokenizer = load_default_model(dtype=getattr(torch, args.dtype))
    with torch.no_grad():  # page the memory-mapped weights in, so that RSS does not count them as the edit's
        model(**tokenizer("Warm up every weight once.", return_tensors="pt"))
    rss = {}
    if not args.no_rss:
        for method in args.methods:
            model, rss[method], _ = edit_once(model, tokenizer, configs[method], requests, tensors=False)
        print(f"Measured RSS of {len(rss)} edit(s).")
    header = (f"{'method':<10} {'estimate MB':>11} {'measured MB':>11} {'ratio':>6} | {'est. work':>9} "
              f"{'meas. work':>10} {'ratio':>6} | {'RSS start':>9} {'RSS peak':>9} {'RSS +':>7} | {'edit s':>6}  "
              "peak phase (plan)")
    print(header)
    print("-" * len(header))
    rows = []
    for method in args.methods:
        config = configs[method]
        plan = estimate_peak_memory(config, "default", requests=requests, batch_size=len(requests), dtype=args.dtype)
        model, tensors, seconds = edit_once(model, tokenizer, config, requests, tensors=True)
        measured, working = tensors.total_tensor_peak_bytes, tensors.peak_tensor_bytes
        resident = rss.get(method)
        row = {
            "method": method,
            "estimate_bytes": plan.total_bytes,
            "estimate_before_loading_bytes": plans[method].total_bytes,
            "measured_tensor_peak_bytes": measured,
            "ratio": plan.total_bytes / measured,
            "estimate_working_bytes": plan.working_bytes,
            "measured_working_bytes": working,
            "working_ratio": plan.working_bytes / working if working else None,
            "weights_bytes_measured": tensors.baseline_tensor_bytes,
            "rss_start_bytes": resident.rss_start_bytes if resident else None,
            "rss_peak_bytes": resident.rss_peak_bytes if resident else None,
            "rss_increase_bytes": resident.rss_increase_bytes if resident else None,
            "edit_seconds_profiled": seconds,
            "peak_phase": plan.peak_phase,
            "components": plan.components,
            "assumptions": plan.assumptions,
        }
        rows.append(row)
        work_ratio = f"{row['working_ratio']:.2f}" if row["working_ratio"] else "-"
        rss_cells = (f"{resident.rss_start_bytes / MB:>9.0f} {resident.rss_peak_bytes / MB:>9.0f} "
                     f"{resident.rss_increase_bytes / MB:>7.1f}") if resident else f"{'-':>9} {'-':>9} {'-':>7}"
        print(f"{method:<10} {plan.total_bytes / MB:>11.1f} {measured / MB:>11.1f} {row['ratio']:>6.3f} | "
              f"{plan.working_bytes / MB:>9.1f} {working / MB:>10.1f} {work_ratio:>6} | {rss_cells} | "
              f"{seconds:>6.1f}  {plan.peak_phase}", flush=True)

    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    within = [r["method"] for r in rows if abs(r["ratio"] - 1) <= GOAL]
    print(f"\nWithin {GOAL:.0%} of the measured tensor peak: {len(within)} of {len(rows)} methods "
          f"(largest deviation: {worst['method']}, ratio {worst['ratio']:.3f}).")
    working = [r for r in rows if r["working_ratio"]]
    if working:
        far = max(working, key=lambda r: abs(r["working_ratio"] - 1))
        print(f"Beyond the weights (working memory): ratios from {min(r['working_ratio'] for r in working):.2f} to "
              f"{max(r['working_ratio'] for r in working):.2f} (largest deviation: {far['method']}).")
    if args.output:
        args.output.write_text(json.dumps({"n": len(requests), "offset": args.offset, "dtype": args.dtype,
                                           "overrides": args.overrides, "rows": rows}, indent=2, sort_keys=True) + "\n")
        print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
