"""Rebuild the tables of docs/results.md (between its <!-- ... --> markers) from every run under runs/; run from the
project root after benchmarks/results/run_single_edits.sh."""
import re
import subprocess
from pathlib import Path


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
doc = Path("docs/results.md").read_text()
for key, table in tables.items():
    pattern = rf"(<!-- {key} -->\n).*?(<!-- /{key} -->)"
    doc = re.sub(pattern, lambda m, table=table: m.group(1) + table + m.group(2), doc, flags=re.S)
Path("docs/results.md").write_text(doc)
print("runs:", len(runs))
