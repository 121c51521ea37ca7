"""Rebuild the tables of docs/results.md from the runs under runs/; run from the project root after
benchmarks/results/run_single_edits.sh.

- Between <!-- KEY --> and <!-- /KEY --> (KEY: token_accuracy, prob_comparison, all): `hf-knowedit report` over every
  run under runs/counterfact and runs/zsre.
- Between <!-- rows KIND --> and <!-- /rows -->: each table row that ends with a run in backticks is recomputed from
  that run (summary_rows.py, KIND batch, sequential, fluency or gpu), keeping its first cell, the method's name. To
  add a row, write `| NAME | `runs/...` |` in the table and run this script.
- Stops, naming them, when runs that docs/results.md names are missing here (runs made before their records were
  kept in git are in no checkout but the one that made them) or are here part-way, being made again, unless
  --allow-missing (rebuild from the runs that are here, dropping the others' rows) or --partial.
- --partial, for a checkout that holds only some of the runs: recompute every row whose run is here and keep the
  others as they are. The table of all runs gets the rows of the runs here, new ones included, in the report's order,
  and keeps the rows of the missing runs. The main tables get the cells of the complete single-edit runs here (the
  runs behind them) and keep their other cells. A set of plots is redrawn only when no run it compares is missing or
  being made again: docs/report_all (the runs of CPU_RUNS) and docs/report_gpu (GPU_RUNS). While a run of CPU_RUNS is,
  the plots of those here go to docs/report_in_git instead (PARTIAL_PLOTS) and docs/report_all is left alone; while a
  run of GPU_RUNS is, docs/report_gpu is left alone. A run here that is not complete, made again after a complete run
  of that folder was lost, keeps the complete run's rows until it completes (`being_redone`).
- docs/report_gpu: the plots of `hf-knowedit report` over the GPU runs under runs/gpu (benchmarks/results/run_gpu.sh),
  kept apart from the CPU runs' plots so that no plot sets GPU seconds beside CPU seconds.
"""
import json
import re
import sys
from pathlib import Path

from hf_knowedit.evaluation.report import find_summaries, markdown_tables, write_plots


sys.path.insert(0, str(Path(__file__).parent))
from summary_rows import row  # noqa: E402


PARTIAL_PLOTS = Path("docs/report_in_git")  # --partial: the plots of the runs here while some CPU runs are missing
CPU_RUNS = ("runs/counterfact", "runs/zsre")  # the folders of the runs of the main tables and docs/report_all
GPU_RUNS = "runs/gpu"  # the folder of the GPU runs (one folder per dataset in it), plotted in docs/report_gpu
RUN_CELL = re.compile(r"\| `([^`]+)` \|$")  # a table row's last cell: the run it comes from


def rows_block(match: re.Match, partial: bool = False, redoing: frozenset = frozenset()) -> str:
    """The table between <!-- rows KIND --> and <!-- /rows --> with each row that names a run recomputed. With
    PARTIAL, the rows of runs not here and of those being made again (REDOING) are kept as they are; without, the
    rows of runs not here are dropped (--allow-missing)."""
    lines = []
    for line in match.group(2).splitlines():
        run = RUN_CELL.search(line)
        here = bool(run) and (Path(run.group(1)) / "summary.json").is_file()
        if not run or (partial and (not here or run.group(1) in redoing)):
            lines.append(line)
        elif here:
            lines.append(row(match.group(1), line.split("|")[1].strip(), run.group(1)))
    return match.group(0).replace(match.group(2), "\n".join(lines))


def cells(line: str) -> list[str]:
    """The cells of a Markdown table row, stripped."""
    return [cell.strip() for cell in line.split("|")[1:-1]]


def table_rows(table: str) -> dict[str, str]:
    """The rows of a table that end with a run, by run."""
    return {run.group(1): line for line in table.splitlines() if (run := RUN_CELL.search(line))}


def being_redone(old_all_runs: str) -> frozenset:
    """The runs here that are not complete, being made again, whose row in the table of all runs OLD_ALL_RUNS says a
    complete run made it (its cases cell `n/n`): a lost run redone part-way keeps the complete run's rows until it
    completes."""
    redoing = set()
    for run, line in table_rows(old_all_runs).items():
        summary = Path(run) / "summary.json"
        # the cases cell: "done/planned", with " (k refused)" after it where edits were refused
        done, planned = re.match(r"(\d+)/(\d+)", cells(line)[5]).groups()
        if summary.is_file() and done == planned and not json.loads(summary.read_text()).get("complete", True):
            redoing.add(run)
    return frozenset(redoing)


def complete_single_runs(runs: list[str]) -> list[str]:
    """The runs of RUNS that edited one case at a time and are complete: those behind the main tables' cells."""
    summaries = {run: json.loads((Path(run) / "summary.json").read_text()) for run in runs}
    return [run for run, s in summaries.items() if s["mode"] == "single" and s.get("complete", True)]


def merge_main_table(old: str, new: str) -> str:
    """The main table OLD (method x dataset) with each of its cells that NEW (the report of some runs) fills replaced
    by NEW's, and NEW's methods that OLD lacks added; the cells NEW leaves empty ("–") are kept."""
    def parse(table):
        lines = table.strip().splitlines()
        return cells(lines[0]), {row[0]: row for line in lines[2:] if (row := cells(line))}

    header, rows = parse(old)
    new_header, new_rows = parse(new)
    for method, new_row in new_rows.items():
        row = rows.setdefault(method, [method] + ["–"] * (len(header) - 1))
        for column, cell in zip(new_header[1:], new_row[1:], strict=True):
            if cell != "–":
                if column not in header:
                    raise SystemExit(f"The report has a column {column!r} that the main table of docs/results.md "
                                     "lacks: rebuild it from every run (without --partial).")
                row[header.index(column)] = cell
    unedited = rows.pop("*unedited model*", None)
    ordered = [rows[m] for m in sorted(rows)] + ([unedited] if unedited else [])
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in ordered]) + "\n\n"


def merge_all_runs(old: str, new: str, redoing: frozenset = frozenset()) -> str:
    """The table of all runs OLD with the rows of NEW (the runs here) replacing or joining its rows, but not those of
    REDOING, in the report's order (dataset, method, mode, batch size, then run), and the † note under it while a
    row it keeps is marked †."""
    rows = table_rows

    def order(line: str) -> tuple:
        row = cells(line)
        return row[1], row[0], row[2].rstrip(" †"), int(row[3]), row[-1].strip("`")

    merged = rows(old) | {run: line for run, line in rows(new).items() if run not in redoing}
    head = new.splitlines()[:2]
    notes = [table.split("\n\n", 1)[1] for table in (new, old) if "\n\n" in table.strip()]
    marked = any(cells(line)[2].endswith("†") for line in merged.values())
    return "\n".join(head + sorted(merged.values(), key=order)) + "\n\n" + (notes[0] if marked and notes else "")


def report(runs: list[str], protocol: str, plots: Path | None = None) -> str:
    """The tables of `hf-knowedit report` over RUNS (run paths as given) in PROTOCOL; with PLOTS, its plots there."""
    found = find_summaries(runs)
    if plots:
        write_plots(found, plots, protocol)
    return markdown_tables(found, protocol) + "\n"  # as in report.md: a blank line ends its last table


def first_few(names: list[str], shown: int = 5) -> str:
    """The first SHOWN names, comma-separated, "..." when there are more, "none" when there are none."""
    return ", ".join(names[:shown] + ["..."] * (len(names) > shown)) or "none"


def main(argv: list[str]):
    partial = "--partial" in argv
    # runs made before their records were kept in git are missing from later checkouts: rebuilding would silently
    # drop their rows and table entries, so stop and say which are missing
    doc = Path("docs/results.md").read_text()
    named = sorted(set(re.findall(r"`(runs/[^`]+?)/?`", doc)))
    # a run sits in a dataset's folder (runs/counterfact/X, runs/fluency/counterfact/X); the folders themselves are
    # named too, in prose
    missing = [run for run in named if Path(run).parent.name in ("counterfact", "zsre")
               and not (Path(run) / "summary.json").is_file() and "*" not in run]
    old_all = re.search(r"<!-- all -->\n(.*?)<!-- /all -->", doc, re.S).group(1)
    redoing = being_redone(old_all)  # here part-way: a rebuild would replace a complete run's rows with theirs
    if (missing or redoing) and not partial and "--allow-missing" not in argv:
        sys.exit(f"Runs named in docs/results.md but not here: {len(missing)} ({first_few(missing)}); here "
                 f"part-way, being made again: {len(redoing)} ({first_few(sorted(redoing))}). Rebuilding would "
                 "drop or replace their rows. Fetch or complete them, or pass --partial (keep "
                 "their rows) or --allow-missing (drop them).")
    runs = sorted(str(p.parent) for folder in CPU_RUNS for p in Path(folder).glob("*/summary.json"))
    # --partial keeps the rows of the missing runs; a set of plots is drawn where it holds every run it compares
    cpu_whole = not redoing and not any(Path(run).parent.as_posix() in CPU_RUNS for run in missing)
    gpu_whole = not any(Path(run).parent.parent.as_posix() == GPU_RUNS for run in missing)
    plots = Path("docs/report_all") if cpu_whole or not partial else PARTIAL_PLOTS
    tables = {}
    for protocol in ("token_accuracy", "prob_comparison"):
        # --partial: the report of some runs gives the rows of the table of all runs; the main tables get the cells
        # of the complete single-edit runs here (a report of those alone)
        text = report(runs, protocol, plots if protocol == "token_accuracy" else None)
        if partial:
            if single_runs := complete_single_runs(runs):  # none here: the main tables stay as they are
                old_main = re.search(rf"<!-- {protocol} -->\n(.*?)<!-- /{protocol} -->", doc, re.S).group(1)
                tables[protocol] = merge_main_table(
                    old_main, re.search(r"\| Method \| .*?\n\n", report(single_runs, protocol), re.S).group(0))
        else:
            tables[protocol] = re.search(r"\| Method \| .*?\n\n", text, re.S).group(0)
        if protocol == "token_accuracy":
            tables["all"] = re.search(r"\| Method \| Dataset \|.*?\n\n(?:† .*?\n\n?)?", text, re.S).group(0)
    gpu_runs = sorted(str(p.parent) for p in Path(GPU_RUNS).glob("*/*/summary.json"))
    if gpu_runs and (gpu_whole or not partial):
        report(gpu_runs, "token_accuracy", Path("docs/report_gpu"))
    if partial:
        tables["all"] = merge_all_runs(old_all, tables["all"], redoing)
    else:
        redoing = frozenset()  # --allow-missing: every run's rows are those of the run here
    for key, table in tables.items():
        pattern = rf"(<!-- {key} -->\n).*?(<!-- /{key} -->)"
        doc = re.sub(pattern, lambda m, table=table: m.group(1) + table + m.group(2), doc, flags=re.S)
    doc = re.sub(r"<!-- rows (\w+) -->\n(.*?)\n<!-- /rows -->", lambda m: rows_block(m, partial, redoing), doc,
                 flags=re.S)
    Path("docs/results.md").write_text(doc)
    print("runs:", len(runs), "GPU runs:", len(gpu_runs),
          f"(--partial: {len(missing)} missing runs' rows kept; main tables' cells of the complete single-edit runs "
          f"here recomputed, the others kept; plots of the runs here in {plots}"
          f"{'' if cpu_whole else ', docs/report_all not rebuilt'}"
          f"{'' if gpu_whole else ', docs/report_gpu not rebuilt'}); being made again, their complete runs' rows kept: "
          f"{', '.join(sorted(redoing)) or 'none'}" if partial else "")


if __name__ == "__main__":
    main(sys.argv[1:])
