"""Print Markdown table rows for the hand-made tables of docs/results.md (batch sweeps, fluency) from run directories.

Usage: python benchmarks/results/summary_rows.py [--fluency] RUN_DIR...
Each row: method, batch size, cases done, token-accuracy reliability / generalization / locality (unchanged), the
same three under prob_comparison, edit seconds per case, peak RSS in GB, the run. With --fluency: method, post-edit
fluency with its 95% interval, token-accuracy reliability, the run (and the untouched model's fluency on stderr).
"""
import argparse
import json
import sys
from pathlib import Path

from hf_knowedit.evaluation.report import _stat


def mean(summary, metric, protocol):
    stats = _stat(summary, metric, protocol)
    return "–" if stats is None else f"{100 * stats['mean']:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--fluency", action="store_true")
    args = parser.parse_args()
    for run in args.runs:
        summary = json.loads((Path(run) / "summary.json").read_text())
        label = summary["method_label"]
        if args.fluency:
            entry = _stat(summary, "fluency", "ngram_entropy")
            pre = _stat(summary, "fluency", "ngram_entropy", side="pre")
            half = (entry["ci95"][1] - entry["ci95"][0]) / 2
            print(f"| {label} | {entry['mean']:.2f} ± {half:.2f} | {mean(summary, 'reliability', 'token_accuracy')} "
                  f"| `{run}` |")
            print(f"untouched model, {run}: {pre['mean']:.2f}", file=sys.stderr)
            continue
        token = [mean(summary, m, "token_accuracy") for m in ("reliability", "generalization", "locality_unchanged")]
        prob = [mean(summary, m, "prob_comparison") for m in ("reliability", "generalization", "locality_unchanged")]
        efficiency = summary["efficiency"]
        print(f"| {label} | {summary['batch_size']:,} | {summary['num_completed']:,} | {' | '.join(token)} "
              f"| {' / '.join(prob)} | {efficiency['edit_seconds_per_case']['mean']:.2f} "
              f"| {efficiency['rss_peak_bytes'] / 1e9:.2f} | `{run}` |")


if __name__ == "__main__":
    main()
