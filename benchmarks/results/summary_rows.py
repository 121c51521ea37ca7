"""Markdown table rows for the batch, sequential, fluency and GPU tables of docs/results.md, from run directories.

Usage: python benchmarks/results/summary_rows.py --kind batch|sequential|fluency|gpu|curve [--protocol P] RUN_DIR...
- batch: method, batch size, cases done, token-accuracy reliability / generalization / locality (unchanged), the same
  three under prob_comparison, edit seconds per case, peak RSS in GB, the run.
- sequential: method (with "to N edits" when the stream stopped early), token-accuracy reliability / generalization /
  locality at the last checkpoint (the end of the stream unless it stopped early), reliability / locality after 100
  edits, edit seconds per case, the run.
- fluency: method, post-edit fluency with its 95% interval, token-accuracy reliability, the run (and the untouched
  model's fluency on stderr).
- gpu: method, mode, dtype, cases, token-accuracy reliability / locality (unchanged), the same two under
  prob_comparison, edit seconds per case on the GPU, on one CPU thread (the run of the same name under
  runs/counterfact, over the same cases, when its config, dtype, mode and batch size match), the ratio, and the peak
  GPU memory in GB.
In the batch table, a run made on a GPU gives its peak GPU memory (marked "GPU") instead of the process RSS.
- batch with --cases FIRST:STOP (command line only): the same cells over those cases of the run (its
  results.jsonl; the peak memory stays the run's), e.g. the halves of a run grown in two sessions.
- batch with --pre (command line only): the same cells for the untouched model on the run's cases (its scores before
  the edits; locality, which compares with them, and the edit's seconds and peak memory are "–").
- edit_stats (command line only): one row per chunk of a single or batch run: its first and last case, and what the
  method reported for its edit (the records' `edit_stats`: steps, losses, seconds of its phases).
- curve (command line only): one row per checkpoint of a sequential run (its curve.jsonl, through summary.json's
  `curve`): edits so far, then reliability / generalization / locality (unchanged) over the cases edited so far,
  under --protocol (default token_accuracy; prob_comparison for P(new) > P(true)).
make_results.py calls row() for every row of the tables marked <!-- rows KIND --> in docs/results.md.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from hf_knowedit.evaluation.harness import _metric_stats, report_label
from hf_knowedit.evaluation.report import _latest_checkpoint, _stat, ran_on_gpu
from hf_knowedit.metrics import PROTOCOLS


TRIPLE = ("reliability", "generalization", "locality_unchanged")


def pct(stats) -> str:
    return "–" if stats is None else f"{100 * stats['mean']:.1f}"


def seconds(summary) -> str:
    value = summary["efficiency"]["edit_seconds_per_case"]["mean"]
    return "–" if value is None else f"{value:.2f}"


def batch_cells(summary) -> list[str]:
    token = [pct(_stat(summary, m, "token_accuracy")) for m in TRIPLE]
    prob = [pct(_stat(summary, m, "prob_comparison")) for m in TRIPLE]
    return [f"{summary['batch_size']:,}", f"{summary['num_completed']:,}", *token, " / ".join(prob), seconds(summary),
            peak_memory(summary)]


def peak_memory(summary, mark_gpu: bool = True) -> str:
    """Peak memory in GB: the GPU's (torch.cuda.max_memory_allocated, marked "GPU" unless `mark_gpu` is false) for
    a run made on a GPU, else the RSS."""
    efficiency = summary["efficiency"]
    if ran_on_gpu(summary):
        return f"{efficiency['cuda_max_allocated_bytes'] / 1e9:.2f}" + (" GPU" if mark_gpu else "")
    return "–" if efficiency["rss_peak_bytes"] is None else f"{efficiency['rss_peak_bytes'] / 1e9:.2f}"


def cpu_seconds_on_same_cases(run: str, summary) -> float | None:
    """Mean edit seconds per case of the CPU run named like RUN under runs/counterfact, over the cases RUN edited,
    if that run has the same method config, dtype, mode and batch size and has edited all of them."""
    cpu_run = Path("runs", "counterfact", Path(run).name)
    if not (cpu_run / "summary.json").is_file():
        return None
    cpu = json.loads((cpu_run / "summary.json").read_text())
    keys = ("config", "dtype", "mode", "batch_size")
    if ran_on_gpu(cpu) or any(cpu["settings"].get(key) != summary["settings"].get(key) for key in keys):
        return None

    def seconds_by_case(directory):
        with open(Path(directory) / "results.jsonl") as handle:
            return {record["index"]: record["edit_seconds"] for record in map(json.loads, handle)}

    wanted, have = seconds_by_case(run), seconds_by_case(cpu_run)
    if not wanted or not set(wanted) <= set(have):
        return None
    return sum(have[index] for index in wanted) / len(wanted)


def gpu_cells(summary, run: str) -> list[str]:
    if not ran_on_gpu(summary):
        raise ValueError(f"{run} was not run on a GPU (its summary's environment.device is "
                         f"{summary.get('environment', {}).get('device')!r})")
    pair = ("reliability", "locality_unchanged")
    mode = "single" if summary["mode"] == "single" else f"{summary['mode']} {summary['batch_size']:,}"
    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[summary["settings"]["dtype"]]
    gpu_seconds = summary["efficiency"]["edit_seconds_per_case"]["mean"]
    cpu_seconds = cpu_seconds_on_same_cases(run, summary)
    ratio = "–" if cpu_seconds is None else f"{cpu_seconds / gpu_seconds:.1f}x"
    return [mode, dtype, f"{summary['num_completed']:,}", *[pct(_stat(summary, m, "token_accuracy")) for m in pair],
            " / ".join(pct(_stat(summary, m, "prob_comparison")) for m in pair), seconds(summary),
            "–" if cpu_seconds is None else f"{cpu_seconds:.2f}", ratio, peak_memory(summary, mark_gpu=False)]


def sequential_cells(summary) -> list[str]:
    def at(point, metrics):  # token accuracy at a curve point
        return [pct(point["metrics"].get(m, {}).get("token_accuracy")) for m in metrics]

    if summary["curve"]:  # the last checkpoint, which is the end of the stream unless it stopped early
        final = at(summary["curve"][-1], TRIPLE)
    else:
        final = [pct(_stat(summary, m, "token_accuracy")) for m in TRIPLE]
    first = [point for point in summary["curve"] if point["num_edits"] == 100]
    if first:
        at_100 = " / ".join(at(first[0], ("reliability", "locality_unchanged")))
    elif summary["curve"]:
        at_100 = "–"
    else:
        at_100 = f"(scored after {summary['num_completed'] or summary['num_cases']} only)"
    return [*final, at_100, seconds(summary)]


def fluency_cells(summary) -> list[str]:
    entry = _stat(summary, "fluency", "ngram_entropy")
    if entry is None:
        raise ValueError("the run has no fluency scores: run it with --fluency-tokens 50")
    half = (entry["ci95"][1] - entry["ci95"][0]) / 2
    return [f"{entry['mean']:.2f} ± {half:.2f}", pct(_stat(summary, "reliability", "token_accuracy"))]


CELLS = {"batch": lambda summary, run: batch_cells(summary),
         "sequential": lambda summary, run: sequential_cells(summary),
         "fluency": lambda summary, run: fluency_cells(summary), "gpu": gpu_cells}


def row(kind: str, label: str, run: str) -> str:
    """One table row: LABEL, the cells of KIND computed from RUN's summary.json, and the run in backticks."""
    # a stream stopped before its end is shown at its last checkpoint
    summary = _latest_checkpoint(json.loads((Path(run) / "summary.json").read_text()))
    if kind == "sequential":
        label = re.sub(r"\s*\(to [\d,]+ edits\)$", "", label)
        last = summary["curve"][-1]["num_edits"] if summary["curve"] else summary["num_completed"]
        if last < summary["num_cases"]:
            label += f" (to {last:,} edits)"
    return f"| {label} | {' | '.join(CELLS[kind](summary, run))} | `{run}` |"


def cases_slice(summary, run: str, first: int, stop: int) -> dict:
    """SUMMARY with its post-edit metrics, cases done and edit seconds per case over cases FIRST..STOP-1 of RUN only
    (its results.jsonl), e.g. the cases a run grown in two sessions made in each."""
    with open(Path(run) / "results.jsonl") as handle:
        records = [record for record in map(json.loads, handle) if first <= record["index"] < stop]
    if not records:
        raise ValueError(f"{run} has no cases in {first}:{stop}")
    seconds = [r["edit_seconds"] for r in records if r.get("edit_seconds") is not None]
    efficiency = {**summary["efficiency"], "edit_seconds_per_case": {"mean": sum(seconds) / len(seconds)
                                                                     if seconds else None}}
    metrics = {**summary["metrics"], "post": _metric_stats(records, "post", tuple(summary["protocols"]))}
    return {**summary, "metrics": metrics, "num_completed": len(records), "efficiency": efficiency}


def untouched_model(summary) -> dict:
    """SUMMARY with the untouched model's scores (its `pre` metrics) in place of the post-edit ones."""
    return {**summary, "metrics": {**summary["metrics"], "post": summary["metrics"]["pre"]}}


def edit_stats_rows(run: str) -> list[str]:
    """One row per chunk of the single or batch run RUN: its first and last case, and its records' `edit_stats`."""
    with open(Path(run) / "results.jsonl") as handle:
        chunks = {}
        for record in map(json.loads, handle):
            chunks.setdefault(record["chunk"], record)
    if not chunks or any("edit_stats" not in record for record in chunks.values()):
        raise ValueError(f"{run} has chunks without edit_stats (made before the harness recorded them, or a stream)")

    def shown(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return [f"| {record['chunk_indices'][0]}-{record['chunk_indices'][-1]} | "
            + ", ".join(f"{key} {shown(value)}" for key, value in record["edit_stats"].items()) + f" | `{run}` |"
            for _, record in sorted(chunks.items())]


def curve_rows(run: str, protocol: str = "token_accuracy") -> list[str]:
    """One row per checkpoint of the sequential run RUN: edits, reliability / generalization / locality under
    PROTOCOL over the cases edited so far."""
    summary = json.loads((Path(run) / "summary.json").read_text())
    if not summary["curve"]:
        raise ValueError(f"{run} has no checkpoints: only sequential runs with --eval-schedule every:K have them")
    return [f"| {point['num_edits']:,} | "
            + " | ".join(pct(point["metrics"].get(m, {}).get(protocol)) for m in TRIPLE) + f" | `{run}` |"
            for point in summary["curve"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--kind", choices=sorted([*CELLS, "curve", "edit_stats"]), required=True)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="token_accuracy", help="--kind curve: the protocol.")
    parser.add_argument("--cases", metavar="FIRST:STOP", help="--kind batch: the figures of cases FIRST..STOP-1 only.")
    parser.add_argument("--pre", action="store_true", help="--kind batch: the untouched model's figures.")
    args = parser.parse_args()
    if (args.cases or args.pre) and args.kind != "batch":
        parser.error("--cases and --pre go with --kind batch")
    for run in args.runs:
        if args.kind in ("curve", "edit_stats"):
            print("\n".join(curve_rows(run, args.protocol) if args.kind == "curve" else edit_stats_rows(run)))
            continue
        summary = json.loads((Path(run) / "summary.json").read_text())
        if args.pre:
            cells = batch_cells(untouched_model(summary))[:-2] + ["–", "–"]  # no edit: no seconds, no peak
            print(f"| untouched model | {' | '.join(cells)} | `{run}` |")
            continue
        if args.cases:
            first, stop = map(int, args.cases.split(":"))
            sliced = cases_slice(summary, run, first, stop)
            print(f"| {report_label(summary)} (cases {first}:{stop}) | {' | '.join(batch_cells(sliced))} | `{run}` |")
            continue
        print(row(args.kind, report_label(summary), run))
        if args.kind == "fluency":
            pre = _stat(summary, "fluency", "ngram_entropy", side="pre")
            untouched = "–" if pre is None else f"{pre['mean']:.2f}"
            print(f"untouched model, {run}: {untouched}", file=sys.stderr)


if __name__ == "__main__":
    main()
