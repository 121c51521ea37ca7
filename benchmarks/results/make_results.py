"""Rebuild the tables of docs/results.md from the runs under runs/; run from the project root after
benchmarks/results/run_single_edits.sh.

- Between <!-- KEY --> and <!-- /KEY --> (KEY: token_accuracy, prob_comparison, all): `hf-knowedit report` over every
  run under runs/counterfact and runs/zsre.
- Between <!-- rows KIND --> and <!-- /rows -->: each table row that ends with a run in backticks is recomputed from
  that run (summary_rows.py, KIND batch, sequential, fluency or gpu), keeping its first cell, the method's name. To
  add a row, write `| NAME | `runs/...` |` in the table and run this script.
- Stops, naming them, when runs that docs/results.md names are missing here (runs/ is not in git), unless
  --allow-missing.
- docs/report_gpu: the plots of `hf-knowedit report` over the GPU runs under runs/gpu (benchmarks/results/run_gpu.sh),
  kept apart from the CPU runs' plots so that no plot sets GPU seconds beside CPU seconds.
"""
import re
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from summary_rows import row  # noqa: E402


def rows_block(match: re.Match) -> str:
    """The table between <!-- rows KIND --> and <!-- /rows --> with each row that names a run recomputed."""
    lines = []
    for line in match.group(2).splitlines():
        run = re.search(r"\| `([^`]+)` \|$", line)
        lines.append(row(match.group(1), line.split("|")[1].strip(), run.group(1)) if run else line)
    return match.group(0).replace(match.group(2), "\n".join(lines))


# runs/ is not in git: on a checkout that lacks some of the runs this page names, rebuilding would silently drop
# their rows and table entries, so stop and say which are missing
named = sorted(set(re.findall(r"`(runs/[^`]+?)/?`", Path("docs/results.md").read_text())))
missing = [run for run in named if Path(run).parent.name in ("counterfact", "zsre", "fluency")
           and not (Path(run) / "summary.json").is_file() and "*" not in run]
if missing and "--allow-missing" not in sys.argv:
    sys.exit(f"{len(missing)} runs named in docs/results.md are not here (first: {', '.join(missing[:5])}); "
             "rebuilding would drop them. Fetch them into runs/, or pass --allow-missing.")
runs = sorted(str(p.parent) for tag in ("counterfact", "zsre") for p in Path("runs", tag).glob("*/summary.json"))
tables = {}
for protocol in ("token_accuracy", "prob_comparison"):
    out = Path("docs/report_all") if protocol == "token_accuracy" else Path(f"/tmp/report_{protocol}")
    subprocess.run([".venv/bin/hf-knowedit", "report", *runs, "--output", str(out), "--protocol", protocol], check=True,
                   capture_output=True)
    text = (out / "report.md").read_text()
    main = re.search(r"\| Method \| ZsRE.*?\n\n", text, re.S).group(0)
    tables[protocol] = main
    if protocol == "token_accuracy":
        tables["all"] = re.search(r"\| Method \| Dataset \|.*?\n\n(?:† .*?\n\n?)?", text, re.S).group(0)
        tables["all"] = re.sub(r"`(\.\./)+(work/main/)?runs/", "`runs/", tables["all"])
gpu_runs = sorted(str(p.parent) for p in Path("runs", "gpu").glob("*/*/summary.json"))
if gpu_runs:
    subprocess.run([".venv/bin/hf-knowedit", "report", *gpu_runs, "--output", "docs/report_gpu"], check=True,
                   capture_output=True)
doc = Path("docs/results.md").read_text()
for key, table in tables.items():
    pattern = rf"(<!-- {key} -->\n).*?(<!-- /{key} -->)"
    doc = re.sub(pattern, lambda m, table=table: m.group(1) + table + m.group(2), doc, flags=re.S)
doc = re.sub(r"<!-- rows (\w+) -->\n(.*?)\n<!-- /rows -->", rows_block, doc, flags=re.S)
Path("docs/results.md").write_text(doc)
print("runs:", len(runs), "GPU runs:", len(gpu_runs))
