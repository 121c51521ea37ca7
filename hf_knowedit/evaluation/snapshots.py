"""Snapshots of a sequential run's edited state, so that a stopped run resumes without recomputing its edits.

Every `snapshot_every` edits of a sequential stream (by default at every checkpoint of `every:K`, every 100 edits with
`immediate` and `final`; a `final` stream also after its last edit, before its scoring), once the scores due by then
are written, the harness writes `snapshots/at-<num_edits>/` into the run directory:

- `edit/`: the accumulated edit, saved as an artifact (`EditedModel.save_pretrained`); absent when every edit so far
  was refused;
- `method_state.safetensors`: what the method keeps between calls outside the edit (AlphaEdit's keys of the edited
  requests, see `BaseEditor.stream_state`), when it keeps anything;
- `progress.json`: the case indices edited so far, with each one's edit seconds and refusal, and the method state's
  metadata.

A snapshot is written into a staging folder and renamed when complete (`hub.atomic_directory`), and the older ones are
then deleted, so an interruption leaves either the new snapshot or the previous one. A resumed run loads the latest
snapshot that holds no edit whose scores are owed (see the harness) and recomputes only the edits after it; since every
chunk is seeded by its number, the stream goes on as if it had never stopped. A snapshot that cannot be loaded is
reported and ignored (the edits are then recomputed). When the stream is complete the snapshots are deleted. Under
several processes the main process writes the snapshots and picks the one to resume from, and every process loads it
from the run's folder (so the processes must see the same folder, as on one machine); if any of them cannot, none keeps
it and all recompute the edits.
"""

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..errors import KnowEditError
from ..hub import atomic_directory
from ..utils import get_logger, write_json


logger = get_logger(__name__)

SNAPSHOTS_DIR = "snapshots"
PROGRESS_NAME = "progress.json"
METHOD_STATE_NAME = "method_state.safetensors"
EDIT_DIR = "edit"
_PREFIX = "at-"


def _snapshot_dirs(output_dir: Path) -> dict[int, Path]:
    root = Path(output_dir) / SNAPSHOTS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for path in root.iterdir():
        number = path.name[len(_PREFIX):]
        if path.is_dir() and path.name.startswith(_PREFIX) and number.isdigit():
            found[int(number)] = path
    return found


def latest_snapshot(output_dir, max_edits: int) -> int:
    """The number of edits of the latest complete snapshot with at most `max_edits` edits (0 when there is none)."""
    return max((n for n in _snapshot_dirs(output_dir) if n <= max_edits), default=0)


def save_snapshot(output_dir, edited, edit_name: str, editor_class, case_indices: list[int],
                  edit_seconds: dict[int, float], refusals: dict[int, str | None]) -> Path:
    """Write the snapshot after the edits of `case_indices` (atomically), then delete the older snapshots."""
    final = Path(output_dir) / SNAPSHOTS_DIR / f"{_PREFIX}{len(case_indices)}"
    with atomic_directory(final) as staging:
        has_edit = edit_name in edited.edit_names
        meta = {}
        if has_edit:
            edited.save_pretrained(staging / EDIT_DIR, edit_names=[edit_name])
            tensors, meta = editor_class.stream_state(edited, edit_name)
            if tensors:
                save_file(tensors, str(staging / METHOD_STATE_NAME))
        write_json(staging / PROGRESS_NAME, {
            "edit": edit_name if has_edit else None,
            "cases": [{"index": i, "edit_seconds": edit_seconds[i], "edit_refused": refusals[i]} for i in case_indices],
            "method_state": meta,
        })
    for path in _snapshot_dirs(output_dir).values():
        if path.name != final.name:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_snapshot(output_dir, num_edits: int, edited, edit_name: str, editor_class, case_indices: list[int]):
    """Install the snapshot after `num_edits` edits on `edited` (which has no edit `edit_name` yet).

    Returns `(edit_seconds, refusals)` by case index, or `None` when the snapshot does not match `case_indices` (the
    first `num_edits` cases of the run) or cannot be loaded: the model is then left as it was and the caller
    recomputes the edits.
    """
    path = _snapshot_dirs(output_dir).get(num_edits)
    if path is None:
        return None
    try:
        progress = json.loads((path / PROGRESS_NAME).read_text())
        cases = progress["cases"]
        if [c["index"] for c in cases] != list(case_indices):
            raise KnowEditError(f"its cases are not the first {num_edits} of this run")
        if progress["edit"] is not None:
            edited.load_edit(path / EDIT_DIR, edit_name=edit_name)
            try:
                state_path = path / METHOD_STATE_NAME
                tensors = load_file(str(state_path)) if state_path.is_file() else {}
                editor_class.restore_stream_state(edited, edit_name, tensors, progress["method_state"])
            except BaseException:
                edited.delete_edit(edit_name)
                raise
    except (KnowEditError, OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("The snapshot %s cannot be used (%s: %s); its edits are recomputed.", path,
                       type(error).__name__, error)
        return None
    return ({c["index"]: c["edit_seconds"] for c in cases}, {c["index"]: c["edit_refused"] for c in cases})


def delete_snapshots(output_dir) -> None:
    shutil.rmtree(Path(output_dir) / SNAPSHOTS_DIR, ignore_errors=True)
