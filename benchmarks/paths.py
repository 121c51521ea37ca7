"""Paths and environment shared by the benchmark scripts (run them as `python benchmarks/<name>.py`).

The data folder is `$HF_KNOWEDIT_DATA_DIR`, else `../shared/data` beside the project; second-moment statistics read
its WikiText unless `HF_KNOWEDIT_STATS_CORPUS` says otherwise, and progress bars are off unless asked for.
"""

import os
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("HF_KNOWEDIT_DATA_DIR", ROOT.parent / "shared" / "data"))
COUNTERFACT = DATA / "counterfact_easyedit" / "counterfact-edit.json"
COUNTERFACT_TRAIN = DATA / "counterfact_easyedit" / "counterfact-train.json"
os.environ.setdefault("HF_KNOWEDIT_STATS_CORPUS", str(DATA / "wikitext"))
os.environ.setdefault("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "1")
