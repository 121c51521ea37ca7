"""Test defaults: offline, quiet, few threads.

The environment is set before anything imports `huggingface_hub`, which reads `HF_HUB_OFFLINE` once at import. The
user's Hugging Face cache is kept (`HF_HOME` is not redirected) so that the default model is converted only once,
under `$HF_HOME/hf_knowedit/models/`; tests that need a cache of their own build it under `tmp_path`.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402

from .helpers import WIKITEXT  # noqa: E402


@pytest.fixture(scope="module")
def isolated_statistics_cache(tmp_path_factory):
    """Second-moment statistics cached in a folder of the test module's own (skipped without the WikiText corpus)."""
    if not WIKITEXT.is_file():
        pytest.skip(f"The statistics corpus {WIKITEXT} is missing.")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_KNOWEDIT_STATS_CACHE", str(tmp_path_factory.mktemp("stats")))
        yield
