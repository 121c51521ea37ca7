"""Small helpers shared across hf-knowedit: logging, progress bars, JSON writing."""

import json
import logging
import os
from pathlib import Path
from typing import Any

from .version import __version__


logger = logging.getLogger("hf_knowedit")
logger.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Return a child of the library's logger (``hf_knowedit.<name>``); the library never configures handlers."""
    return logging.getLogger(f"hf_knowedit.{name.removeprefix('hf_knowedit.')}")


def progress_enabled() -> bool:
    """Progress bars are on unless ``HF_KNOWEDIT_DISABLE_PROGRESS_BARS`` (or transformers' switch) is set."""
    for var in ("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return True


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm`` that honours :func:`progress_enabled` unless ``disable`` is passed explicitly."""
    from tqdm.auto import tqdm as _tqdm

    kwargs.setdefault("disable", not progress_enabled())
    return _tqdm(*args, **kwargs)


def dump_json(obj: Any) -> str:
    """Serialise ``obj`` the way every hf-knowedit JSON file is written: ``indent=2, sort_keys=True``."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: dict, stamp: bool = True) -> None:
    """Write ``obj`` as JSON, adding the library version under ``hf_knowedit_version`` when ``stamp``."""
    if stamp:
        obj = {**obj, "hf_knowedit_version": __version__}
    Path(path).write_text(dump_json(obj), encoding="utf-8")
