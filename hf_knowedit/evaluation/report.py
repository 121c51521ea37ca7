"""Reports of evaluation runs: Markdown tables and PNG plots, from the runs' `summary.json` files.

- The main table is shaped like Table 2 of the KnowEdit survey (Zhang et al. 2024, "A Comprehensive Study of Knowledge
  Editing for Large Language Models"): one row per method, one group of columns per dataset with Reliability,
  Generalization, Locality and Portability, in one protocol. Each (method, dataset) cell group comes from the run that
  is closest to editing one fact at a time (mode `single`, else the smallest batch, else sequential).
- A second table lists every run with its mode, batch size, schedule, number of cases, all metrics, time and memory.
- Plots: each metric against the number of edits (batch size for batch runs, edits applied for sequential runs), one
  figure per dataset; and edit time per case and peak memory per run. A line joins the batch runs of one method and
  config, and each sequential run has its own; where two lines or bars would share a name, the config fields that
  tell them apart (else the run directory) are added to it.
"""

import json
import os
from pathlib import Path

from ..config import with_default_fields
from ..training import UNTRAINED
from .harness import EDITOR_KEY, NOT_COMPARED_CONFIG_FIELDS, SUMMARY_NAME, refresh_intervals, report_label


TABLE_METRICS = (("reliability", "Rel."), ("generalization", "Gen."), ("locality_unchanged", "Loc."),
                 ("portability", "Port."))
ALL_METRICS = TABLE_METRICS + (("locality_ground_truth", "Loc. (GT)"), ("fluency", "Flu."))


def find_summaries(paths: list[str | os.PathLike]) -> list[tuple[Path, dict]]:
    """`(run directory, summary)` for each path that is a run, or each run found below a path, sorted by path.

    Summaries written before scores named their intervals get the current ones here (`refresh_intervals`), and
    those labelled by an earlier default label (`TPATCHER`) today's (`T-Patcher`, `report_label`).
    """
    found = []
    for path in paths:
        path = Path(path)
        if (path / SUMMARY_NAME).is_file():
            candidates = [path / SUMMARY_NAME]
        elif path.is_dir():
            candidates = sorted(path.rglob(SUMMARY_NAME))
        else:
            candidates = []
        if not candidates:
            from .harness import EvaluationSettingsError

            raise EvaluationSettingsError(f"No {SUMMARY_NAME} in or below {str(path)!r}: not an evaluation run.")
        for candidate in candidates:
            summary = refresh_intervals(json.loads(candidate.read_text(encoding="utf-8")))
            summary["method_label"] = report_label(summary)
            found.append((candidate.parent, summary))
    unique = {str(directory): (directory, _latest_checkpoint(summary)) for directory, summary in found}
    return [unique[key] for key in sorted(unique)]


def _latest_checkpoint(summary: dict) -> dict:
    """An interrupted sequential `every:K` run is shown at its last checkpoint (all cases edited so far), with the
    edit seconds of that checkpoint (per case and in total) where it recorded them."""
    if summary["mode"] != "sequential" or summary.get("complete", True) or not summary.get("curve"):
        return summary
    point = max(summary["curve"], key=lambda p: p["num_edits"])
    efficiency = summary["efficiency"]
    seconds = point.get("edit_seconds_per_case")  # checkpoints written by earlier versions have none
    if seconds is not None:
        total = seconds["mean"] * seconds["n"] if seconds["mean"] is not None else 0.0
        efficiency = {**efficiency, "edit_seconds_per_case": seconds, "edit_seconds_total": total}
    return {**summary, "metrics": {**summary["metrics"], "post": point["metrics"]}, "efficiency": efficiency,
            "num_completed": point["num_edits"], "shown_at_checkpoint": point["num_edits"],
            "edits_refused": point.get("edits_refused", summary.get("edits_refused"))}


def _stat(summary: dict, metric: str, protocol: str, side: str = "post") -> dict | None:
    protocol = "ngram_entropy" if metric == "fluency" else protocol
    stats = summary["metrics"][side].get(metric, {}).get(protocol)
    return stats if stats and stats.get("mean") is not None else None


def _cell(summary: dict, metric: str, protocol: str, scale: float = 100.0, side: str = "post") -> str:
    stats = _stat(summary, metric, protocol, side)
    if stats is None:
        return "–"
    if metric == "fluency":
        scale = 1.0
    low, high = stats["ci95"]
    reach = max(stats["mean"] - low, high - stats["mean"])  # Wilson's interval is lopsided near 0 and 1
    return f"{stats['mean'] * scale:.1f} ± {reach * scale:.1f}"


def _x_edits(summary: dict) -> int:
    return summary["batch_size"] if summary["mode"] != "sequential" else summary["num_completed"]


def _main_rank(summary: dict) -> tuple:
    order = {"single": 0, "batch": 1, "sequential": 2}
    return (not summary.get("complete", True), order[summary["mode"]], summary["batch_size"])


def markdown_tables(runs: list[tuple[Path, dict]], protocol: str = "token_accuracy", relative_to=None) -> str:
    """The main method x dataset table and the table of all runs, in Markdown."""
    datasets = sorted({s["dataset_name"] for _, s in runs})
    methods = sorted({s["method_label"] for _, s in runs})
    best: dict[tuple[str, str], tuple[Path, dict]] = {}
    for directory, summary in runs:
        key = (summary["method_label"], summary["dataset_name"])
        if key not in best or _main_rank(summary) < _main_rank(best[key][1]):
            best[key] = (directory, summary)
    lines = [f"Scores in % (mean ± its distance to the farther end of the 95% confidence interval over cases), "
             f"protocol `{protocol}`, "
             "locality = prediction unchanged by the edit.", ""]
    header = "| Method | " + " | ".join(f"{d} {label}" for d in datasets for _, label in TABLE_METRICS) + " |"
    lines += [header, "|---|" + "---|" * (len(datasets) * len(TABLE_METRICS))]
    for method in methods:
        cells = []
        for dataset in datasets:
            entry = best.get((method, dataset))
            cells += [_cell(entry[1], metric, protocol) if entry else "–" for metric, _ in TABLE_METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    cells, unedited = [], {}
    for dataset in datasets:  # the untouched model, scored on the cases of the table's run that covers the most
        entries = [best[(m, dataset)] for m in methods if (m, dataset) in best]
        entry = max(entries, key=lambda e: e[1]["num_completed"], default=None)
        if entry:
            unedited[dataset] = entry
        cells += [_cell(entry[1], metric, protocol, side="pre") if entry else "–" for metric, _ in TABLE_METRICS]
    lines.append("| *unedited model* | " + " | ".join(cells) + " |")
    lines += ["", "Runs behind each row (the run closest to one edit at a time):", ""]
    for (method, dataset), (directory, summary) in sorted(best.items()):
        lines.append(f"- {method} / {dataset}: `{_rel(directory, relative_to)}` ({_describe(summary)})")
    for dataset, (directory, summary) in unedited.items():
        lines.append(f"- *unedited model* / {dataset}: the pre-edit scores of `{_rel(directory, relative_to)}` "
                     f"({summary['num_completed']} cases)")
    lines += ["", "All runs:", "",
              "| Method | Dataset | Mode | Batch | Schedule | Cases | "
              + " | ".join(label for _, label in ALL_METRICS) + " | Edit s/case | Peak RSS GB | Run |",
              "|---|---|---|---|---|---|" + "---|" * len(ALL_METRICS) + "---|---|---|"]
    labelled = zip(runs, config_variant_names(runs), strict=True)
    for (directory, summary), label in sorted(labelled, key=lambda r: (r[0][1]["dataset_name"], r[1],
                                                                       r[0][1]["mode"], r[0][1]["batch_size"])):
        eff = summary["efficiency"]
        seconds = eff["edit_seconds_per_case"]["mean"]
        rss = eff.get("rss_peak_bytes")
        lines.append(
            f"| {label} | {summary['dataset_name']} | {summary['mode']}"
            f"{' †' if _editor_saw_probes(summary) else ''} | {summary['batch_size']} | {summary['eval_schedule']} | "
            f"{summary['num_completed']}/{summary['num_cases']}"
            f"{f' ({refused} refused)' if (refused := summary.get('edits_refused')) else ''} | "
            + " | ".join(_cell(summary, metric, protocol) for metric, _ in ALL_METRICS)
            + f" | {f'{seconds:.2f}' if seconds is not None else '–'} | {f'{rss / 1e9:.2f}' if rss else '–'} | "
            f"`{_rel(directory, relative_to)}` |"
        )
    if any(_editor_saw_probes(summary) for _, summary in runs):
        lines += ["", "† The editor was given the rephrase, locality and portability prompts it was scored on "
                  "(`editor_sees_probes`; runs made before that setting existed read as such)."]
    return "\n".join(lines) + "\n"


def config_variant_names(runs: list[tuple[Path, dict]]) -> list[str]:
    """The method's label of each run, followed, where runs of one method ran with different configs or settings
    (say IKE with CounterFact's and with zsRE's demonstrations), by the fields whose values tell them apart."""
    return _distinct_names(runs, lambda s: s["method_label"],
                           lambda d, s: json.dumps(_variant(s), sort_keys=True, default=str))


def _editor_saw_probes(summary: dict) -> bool:
    return summary.get("settings", {}).get("editor_sees_probes", True)


def _describe(summary: dict) -> str:
    text = f"{summary['mode']}, batch {summary['batch_size']}, schedule {summary['eval_schedule']}, " \
           f"{summary['num_completed']}/{summary['num_cases']} cases"
    if _editor_saw_probes(summary):
        text += ", the editor saw the probes"
    if editor := summary.get(EDITOR_KEY):
        text += f", trained editor {editor['sha256'][:12]} ({editor.get('steps')} steps)"
    if "shown_at_checkpoint" in summary:
        text += f", interrupted: scores of the checkpoint after {summary['shown_at_checkpoint']} edits"
    return text + ("" if summary.get("complete", True) else ", incomplete")


def _rel(path: Path, relative_to) -> str:
    if relative_to is None:
        return str(path)
    try:
        return os.path.relpath(path, relative_to)
    except ValueError:
        return str(path)


def _variant(summary: dict) -> dict:
    """The method's config and the settings that change what an editor does."""
    settings = summary.get("settings") or {}
    # a field the config class gained after the run, at its default, tells no runs apart
    config = with_default_fields(summary.get("method"), summary.get("method_config") or {}, NOT_COMPARED_CONFIG_FIELDS)
    variant = {**config, "editor_sees_probes": _editor_saw_probes(summary),
               "chat_template": bool(settings.get("chat_template"))}
    if isinstance(config.get("editor"), str) and config["editor"] != UNTRAINED:
        # one path (runs/mend-smollm2) may have held editors trained at different times: their weights tell them apart
        identity = summary.get(EDITOR_KEY) or {}
        variant["editor_weights"] = identity.get("sha256", "unrecorded")[:12]
    return variant


def _series_key(directory: Path, summary: dict) -> tuple:
    """What joins runs into one line: a sequential run is its own line, batch runs of a method share one per config
    and setting."""
    if summary["mode"] == "sequential":
        return ("run", str(directory))
    return ("batch", json.dumps(_variant(summary), sort_keys=True, default=str))


def _distinct_names(runs: list[tuple[Path, dict]], base, key) -> list[str]:
    """A name per run: `base(summary)`, and where several series (`key(directory, summary)`) share that name, the
    config fields and settings whose values differ between them, else the run's directory name."""
    keys = [key(directory, summary) for directory, summary in runs]
    groups: dict[str, dict] = {}
    for (directory, summary), series in zip(runs, keys):
        groups.setdefault(base(summary), {}).setdefault(series, (directory, summary))
    suffixes = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        variants = {series: _variant(summary) for series, (_, summary) in members.items()}
        fields = sorted(name for name in {n for v in variants.values() for n in v}
                        if len({json.dumps(v.get(name), sort_keys=True, default=str) for v in variants.values()}) > 1)
        text = {series: ", ".join(f"{name}={_short(variants[series].get(name))}" for name in fields)
                for series in members}
        if not fields or len(set(text.values())) < len(members):
            text = {series: directory.name for series, (directory, _) in members.items()}
        suffixes.update(text)
    return [base(summary) + (f" ({suffixes[series]})" if series in suffixes else "")
            for (_, summary), series in zip(runs, keys)]


def _short(value, width: int = 28) -> str:
    text = value.rsplit("/", 1)[-1] if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _legend_below(fig, entries: list[tuple]) -> None:
    """A legend of `entries` (handle, name) under the plots of `fig`, in as many columns as fit its width (each column
    as wide as its longest name); `savefig(bbox_inches="tight")` takes it into the image."""
    renderer = fig.canvas.get_renderer()
    width = fig.get_figwidth() * fig.dpi
    handles, names = [h for h, _ in entries], [n for _, n in entries]
    for columns in range(min(len(names), 6), 0, -1):
        legend = fig.legend(handles, names, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns,
                            frameon=False)
        if columns == 1 or legend.get_window_extent(renderer).width <= width:
            return
        legend.remove()


def series_style(index: int) -> tuple[int, str]:
    """The tab20 colour and the marker of the `index`-th series of a plot: the ten strong hues first, then their light
    shades (tab20 lists each strong hue next to its light shade, which two neighbouring series could hardly be told
    apart by), then the twenty colours again with the next marker."""
    return (2 * index) % 20 + (index // 10) % 2, "os^Dv"[index // 20 % 5]


def plot_metrics_vs_edits(runs: list[tuple[Path, dict]], output_dir: Path, protocol: str = "token_accuracy"):
    """One PNG per dataset: each metric against the number of edits, a line per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files = []
    for dataset in sorted({s["dataset_name"] for _, s in runs}):
        selected = [(d, s) for d, s in runs if s["dataset_name"] == dataset]
        subset = [s for _, s in selected]
        metrics = [(m, label) for m, label in ALL_METRICS if any(_stat(s, m, protocol) for s in subset)]
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 2.2, 3.4), squeeze=False)
        run_names = _distinct_names(
            selected, lambda s: f"{s['method_label']} {s['mode'] if s['mode'] != 'single' else 'batch'}", _series_key)
        names = sorted(set(run_names))
        colours = plt.get_cmap("tab20")
        styles = {}
        for i, name in enumerate(names):
            colour, marker = series_style(i)
            styles[name] = dict(color=colours(colour), marker=marker)
        for ax, (metric, label) in zip(axes[0], metrics):
            series: dict[str, list[tuple[int, float]]] = {}
            for summary, name in zip(subset, run_names):
                if summary["mode"] == "sequential" and summary.get("curve"):
                    for point in summary["curve"]:
                        stats = point["metrics"].get(metric, {}).get(
                            "ngram_entropy" if metric == "fluency" else protocol)
                        if stats and stats.get("mean") is not None:
                            series.setdefault(name, []).append((point["num_edits"], stats["mean"]))
                    continue
                stats = _stat(summary, metric, protocol)
                if stats is not None:
                    series.setdefault(name, []).append((_x_edits(summary), stats["mean"]))
            for name, points in sorted(series.items()):
                points = sorted(dict(points).items())
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **styles[name])
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("number of edits")
            if metric != "fluency":
                ax.set_ylim(-0.02, 1.02)
            ax.set_title(label if metric == "fluency" else f"{label} ({protocol})", fontsize=9)
            ax.grid(alpha=0.3)
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
        fig.suptitle(f"{dataset}: x = batch size (batch runs) or edits applied so far (sequential runs)", fontsize=10)
        fig.tight_layout()
        _legend_below(fig, [(handles[n], n) for n in names if n in handles])
        path = output_dir / f"metrics_vs_edits_{_slug(dataset)}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)
    return files


def ran_on_gpu(summary: dict) -> bool:
    """Whether the run of `summary` was made on a GPU (its `environment.device`)."""
    return str(summary.get("environment", {}).get("device", "")).startswith("cuda")


def efficiency_names(runs: list[tuple[Path, dict]]) -> list[str]:
    """The bar names of the efficiency plot: method, dataset, mode and batch size, "GPU" for a run made on a GPU (its
    timings are not comparable with a CPU run's), and what tells apart runs that would still share a name."""
    return _distinct_names(runs, lambda s: f"{s['method_label']} {_short(s['dataset_name'], 20)} {s['mode'][:3]} "
                                           f"b{s['batch_size']}{' GPU' if ran_on_gpu(s) else ''}",
                           lambda d, s: str(d))


def plot_efficiency(runs: list[tuple[Path, dict]], output_dir: Path):
    """A PNG with the mean edit time per case and the peak memory of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [(d, s) for d, s in runs if s["efficiency"]["edit_seconds_per_case"]["mean"] is not None]
    names = efficiency_names(timed)
    rows = [(name, s["efficiency"]["edit_seconds_per_case"]["mean"],
             (s["efficiency"].get("cuda_max_allocated_bytes") or s["efficiency"].get("rss_peak_bytes") or 0) / 1e9)
            for name, (_, s) in zip(names, timed)]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.25 * len(rows) + 1.2), sharey=True)
    labels = [r[0] for r in rows]
    axes[0].barh(labels, [r[1] for r in rows])
    axes[0].set_xlabel("edit seconds per case")
    axes[1].barh(labels, [r[2] for r in rows])
    axes[1].set_xlabel("peak memory, GB (CUDA allocated, else process RSS)")
    axes[1].tick_params(axis="y", labelleft=False)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_ylim(-0.7, len(rows) - 0.3)  # both: the y axis is shared
    # the names take their own width left of the bars, which keep theirs however long the names are
    renderer = fig.canvas.get_renderer()
    names_width = max(t.get_window_extent(renderer).width for t in axes[0].get_yticklabels()) / fig.dpi + 0.2
    width, height = fig.get_figwidth() + names_width, fig.get_figheight()
    fig.set_figwidth(width)
    fig.subplots_adjust(left=(names_width + 0.1) / width, right=1 - 0.2 / width, bottom=0.55 / height,
                        top=1 - 0.15 / height, wspace=0.08)
    path = output_dir / "efficiency.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def write_plots(runs: list[tuple[Path, dict]], output_dir: str | os.PathLike,
                protocol: str = "token_accuracy") -> list[Path]:
    """Write the PNG plots of `runs` (from `find_summaries`) into `output_dir`: each metric against the number of edits
    per dataset, and time and memory per run; return the files written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return plot_metrics_vs_edits(runs, output_dir, protocol) + plot_efficiency(runs, output_dir)


def write_report(paths: list[str | os.PathLike], output_dir: str | os.PathLike,
                 protocol: str = "token_accuracy") -> list[Path]:
    """Write `report.md` and the PNG plots of the runs in `paths` into `output_dir`; return the files written."""
    output_dir = Path(output_dir)
    runs = find_summaries(paths)
    plots = write_plots(runs, output_dir, protocol)
    text = "# Evaluation report\n\n" + markdown_tables(runs, protocol, relative_to=output_dir) + "\n"
    text += "".join(f"![{p.stem}]({p.name})\n\n" for p in plots)
    report = output_dir / "report.md"
    report.write_text(text, encoding="utf-8")
    return [report, *plots]


__all__ = [
    "find_summaries", "markdown_tables", "plot_efficiency", "plot_metrics_vs_edits", "write_plots", "write_report",
]
