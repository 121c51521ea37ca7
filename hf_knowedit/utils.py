"""Small helpers shared across hf-knowedit: logging, progress bars, JSON writing."""

import hashlib
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


def sha256_json(obj: Any) -> str:
    """The SHA-256 of ``obj`` written as compact JSON with sorted keys (values JSON cannot hold written with ``str``):
    a key for caches and stored work that is equal for equal content in any process.

    >>> sha256_json({"b": 1, "a": [2]}) == sha256_json({"a": [2], "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def write_json(path: str | os.PathLike, obj: dict, stamp: bool = True) -> None:
    """Write ``obj`` as JSON, adding the library version under ``hf_knowedit_version`` when ``stamp``."""
    if stamp:
        obj = {**obj, "hf_knowedit_version": __version__}
    Path(path).write_text(dump_json(obj), encoding="utf-8")


def parse_overrides(items: list[str], example: str = "num_steps=10") -> dict[str, Any]:
    """`KEY=VALUE` command-line items as a dict; values are read as JSON, else kept as strings (`a-b` keys -> `a_b`).

    >>> parse_overrides(["num_steps=10", "layers=[3, 4]", "variant=ft_l"])
    {'num_steps': 10, 'layers': [3, 4], 'variant': 'ft_l'}
    """
    from .errors import EditConfigError

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise EditConfigError(f"--set expects KEY=VALUE, got {item!r}; e.g. --set {example}.")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values
