"""Markdown table rows for the batch, sequential and fluency tables of docs/results.md, from run directories.

Usage: python benchmarks/results/summary_rows.py --kind batch|sequential|fluency RUN_DIR...
- batch: method, batch size, cases done, token-accuracy reliability / generalization / locality (unchanged), the same
  three under prob_comparison, edit seconds per case, peak RSS in GB, the run.
- sequential: method (with "to N edits" when the stream stopped early), token-accuracy reliability / generalization /
  locality at the last checkpoint (the end of the stream unless it stopped early), reliability / locality after 100
  edits, edit seconds per case, the run.
- fluency: method, post-edit fluency with its 95% interval, token-accuracy reliability, the run (and the untouched
  model's fluency on stderr).
make_results.py calls row() for every row of the tables marked <!-- rows KIND --> in docs/results.md.
"""
import argparse
import json
import re
import sys
from pathlib import Path

from hf_knowedit.evaluation.report import _stat


TRIPLE = ("reliability", "generalization", "locality_unchanged")


def pct(stats) -> str:
    return "–" if stats is None else f"{100 * stats['mean']:.1f}"


def seconds(summary) -> str:
    value = summary["efficiency"]["edit_seconds_per_case"]["mean"]
    return "–" if value is None else f"{value:.2f}"


def batch_cells(summary) -> list[str]:
    token = [pct(_stat(summary, m, "token_accuracy")) for m in TRIPLE]
    prob = [pct(_stat(summary, m, "prob_comparison")) for m in TRIPLE]
    rss = summary["efficiency"]["rss_peak_bytes"]
    return [f"{summary['batch_size']:,}", f"{summary['num_completed']:,}", *token, " / ".join(prob), seconds(summary),
            "–" if rss is None else f"{rss / 1e9:.2f}"]


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


CELLS = {"batch": batch_cells, "sequential": sequential_cells, "fluency": fluency_cells}


def row(kind: str, label: str, run: str) -> str:
    """One table row: LABEL, the cells of KIND computed from RUN's summary.json, and the run in backticks."""
    summary = json.loads((Path(run) / "summary.json").read_text())
    if kind == "sequential":
        label = re.sub(r"\s*\(to [\d,]+ edits\)$", "", label)
        last = summary["curve"][-1]["num_edits"] if summary["curve"] else summary["num_completed"]
        if last < summary["num_cases"]:
            label += f" (to {last:,} edits)"
    return f"| {label} | {' | '.join(CELLS[kind](summary))} | `{run}` |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--kind", choices=sorted(CELLS), required=True)
    args = parser.parse_args()
    for run in args.runs:
        summary = json.loads((Path(run) / "summary.json").read_text())
        print(row(args.kind, summary["method_label"], run))
        if args.kind == "fluency":
            pre = _stat(summary, "fluency", "ngram_entropy", side="pre")
            untouched = "–" if pre is None else f"{pre['mean']:.2f}"
            print(f"untouched model, {run}: {untouched}", file=sys.stderr)


if __name__ == "__main__":
    main()
