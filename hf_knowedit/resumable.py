"""Resumable edits: the long per-request work of an edit written to a folder as it is done, so that an edit stopped
part-way goes on from there instead of from the start.

A batch of 1,000 facts takes hours on a CPU (MEMIT's and AlphaEdit's target values, KN's neuron attributions), and
an edit is all or nothing: stopped at request 900, it used to start again from request 1. Inside
:func:`resumable_edits`, the editors that have such work store each finished piece (a chunk of target values, one
request's knowledge neurons) under the folder, keyed by a SHA-256 of everything it depends on: the model's exact state
(every base tensor's bytes, the tokenizer's vocabulary, the active and pending edits' tensors), the config fields and
request fields it reads, the library's version and the device. A later edit inside the same folder reads the pieces
whose key matches instead of computing them, and computes the others, so it gives the edit of an uninterrupted call.
The keys make a stale piece impossible to reuse by mistake: another model, config or request gives another key.

Hashing the model's tensors takes 0.8 s for the 135M fp32 parameters of the default model on a CPU, once per edit
call (`benchmarks/bench_foundation.py` times it; weights offloaded by accelerate are read one module at a time):
worth it for long edits, not for single facts, which is why this is opt-in. The folder may be deleted once the edit
is done.

Example:

```python
>>> import tempfile
>>> from hf_knowedit import EditedModel, EditRequest
>>> from hf_knowedit.methods.memit import MEMITConfig
>>> from tests.tiny_models import tiny_model, tiny_tokenizer
>>> request = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis")
>>> config = MEMITConfig(layers=[0, 1], v_num_grad_steps=2, mom2_adjustment=False)
>>> with tempfile.TemporaryDirectory() as folder, resumable_edits(folder) as work:
...     edited = EditedModel(tiny_model("gpt2"), tiny_tokenizer()).add_edits(config, [request])
...     (work.computed, work.reused)
(1, 0)

```
"""

import json
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .devices import input_device
from .utils import get_logger, sha256_json
from .version import __version__


logger = get_logger(__name__)
_ACTIVE: ContextVar["EditWork | None"] = ContextVar("hf_knowedit_edit_work", default=None)


class EditWork:
    """The pieces of edits stored under `directory` (see the module's docstring); counts what it computed and reused.

    Attributes:
        computed (`int`), reused (`int`): pieces computed (and stored) and pieces read back, since the folder was
            opened.
        reused_seconds (`float`): the seconds the reused pieces took when they were computed, so that an edit's time
            can be reported as that of an uninterrupted call.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.computed = self.reused = 0
        self.reused_seconds = 0.0
        self._state: tuple[Any, list, str] | None = None  # (computation state key, its objects, digest)

    def state_digest(self, edited_model) -> str:
        """The SHA-256 of `edited_model`'s exact state (offloaded weights included), computed once while its state
        stays the same."""
        key, objects = edited_model.computation_state()
        if self._state is None or self._state[0] != key:
            start = time.perf_counter()
            self._state = (key, objects, edited_model.state_digest())
            logger.debug("Hashed the model's state in %.1f s", time.perf_counter() - start)
        return self._state[2]

    def piece(self, kind: str, edited_model, inputs: dict, compute: Callable[[], dict[str, torch.Tensor]]
              ) -> dict[str, torch.Tensor]:
        """The tensors `compute()` returns for `inputs` (JSON-ready: what the computation reads besides the model),
        read from the folder when a piece of this `kind` with the same key is there, else computed and stored."""
        key = sha256_json({"kind": kind, "inputs": inputs, "model_state": self.state_digest(edited_model),
                           "device": str(input_device(edited_model.base_model)),
                           "hf_knowedit_version": __version__})
        path = self.directory / f"{kind}-{key[:40]}.safetensors"
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as stored:
                    metadata = stored.metadata()
                    seconds, devices = float(metadata["seconds"]), json.loads(metadata["devices"])
                    # each tensor back where the computation left it (a device map spreads the layers)
                    tensors = {name: stored.get_tensor(name).to(devices[name]) for name in stored.keys()}
            except Exception as error:  # a damaged piece is computed again, not trusted
                logger.warning("Ignoring the unreadable piece %s (%s: %s)", path.name, type(error).__name__, error)
            else:
                self.reused += 1
                self.reused_seconds += seconds
                return tensors
        start = time.perf_counter()
        tensors = compute()
        seconds = time.perf_counter() - start
        if any(not isinstance(t, torch.Tensor) for t in tensors.values()):
            raise TypeError(f"A piece of edit work ({kind}) must be a dict of tensors.")
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        devices = json.dumps({name: str(t.device) for name, t in tensors.items()})
        save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(staging),
                  metadata={"seconds": repr(seconds), "kind": kind, "devices": devices})
        os.replace(staging, path)  # a piece is there whole or not at all
        self.computed += 1
        return tensors


@contextmanager
def resumable_edits(directory: str | os.PathLike):
    """Within the block, editors store their long per-request work under `directory` and reuse what is there (see
    the module's docstring). Yields the :class:`EditWork`, whose counts say what was computed and reused.

    Args:
        directory (`str` or `os.PathLike`): a folder (created if missing); give the same one to resume an edit.
    """
    work = EditWork(directory)
    token = _ACTIVE.set(work)
    try:
        yield work
    finally:
        _ACTIVE.reset(token)


def edit_work_piece(kind: str, edited_model, inputs: dict, compute: Callable[[], dict[str, torch.Tensor]]
                    ) -> dict[str, torch.Tensor]:
    """`compute()`, or inside :func:`resumable_edits` the piece stored for `inputs` (see :meth:`EditWork.piece`)."""
    work = _ACTIVE.get()
    return compute() if work is None else work.piece(kind, edited_model, inputs, compute)


def active_edit_work() -> EditWork | None:
    """The :class:`EditWork` of the enclosing :func:`resumable_edits` block, if any."""
    return _ACTIVE.get()


__all__ = ["EditWork", "active_edit_work", "edit_work_piece", "resumable_edits"]
