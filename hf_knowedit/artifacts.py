"""The on-disk format of an edit.

An edit directory holds:

- `edit_config.json`: the method's config, the base model's fingerprint, what each module's components are, and the
  SHA-256 of the weights file;
- `edit_weights.safetensors`: the components' tensors (factors for low-rank edits, touched slices for sparse ones),
  keyed `<module path>.<index>.<tensor name>`;
- `edit_requests.jsonl`: the requests, one JSON object a line;
- `README.md`: a model card rendered from `hub_cards/edit_card.md`, with YAML metadata for the Hub.

Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

import hashlib
import json
from importlib import resources
from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import EditConfig, read_config_file
from .deltas import component_from_state
from .errors import ArtifactError, EditConfigError
from .hub import atomic_directory
from .requests import EditRequest
from .utils import dump_json
from .version import __version__


WEIGHTS_NAME = "edit_weights.safetensors"
REQUESTS_NAME = "edit_requests.jsonl"
CARD_NAME = "README.md"
CARD_TEMPLATE = "edit_card.md"
MAX_CARD_REQUESTS = 20


def save_edits(edited, names: list[str], save_directory, card_metrics: dict | None = None) -> dict[str, int]:
    """Write the named edits of `edited` into `save_directory` atomically; return the bytes written per edit."""
    sizes = {}
    with atomic_directory(save_directory) as staging:
        for name in names:
            directory = staging if name == "default" else staging / name
            directory.mkdir(parents=True, exist_ok=True)
            sizes[name] = write_edit_dir(edited, name, directory, card_metrics)
    return sizes


def write_edit_dir(edited, name: str, directory: Path, card_metrics: dict | None = None) -> int:
    edit = edited.get_edit(name)
    tensors, modules = {}, {}
    for path, comps in edit.components.items():
        entries = []
        for index, comp in enumerate(comps):
            state = {k: v.detach().cpu().contiguous() for k, v in comp.state_dict().items()}
            tensors.update({f"{path}.{index}.{key}": value for key, value in state.items()})
            entries.append({"kind": comp.kind, "meta": comp.extra_meta(), "tensors": sorted(state)})
        modules[path] = entries
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={
        "format": "pt", "hf_knowedit_version": __version__, "edit_type": edit.config.edit_type,
    })
    stats = {k: v for k, v in edit.stats.items() if isinstance(v, (int, float, str, bool, dict, list))}
    edit.config.save_pretrained(
        directory,
        base_model_fingerprint=edit.fingerprint,
        edit_modules=modules,
        num_requests=len(edit.requests),
        edit_stats=stats,
        weights_sha256=file_sha256(directory / WEIGHTS_NAME),
    )
    with open(directory / REQUESTS_NAME, "w", encoding="utf-8") as handle:
        for request in edit.requests:
            handle.write(json.dumps(request.to_dict(), sort_keys=True, ensure_ascii=False) + "\n")
    weight_bytes = (directory / WEIGHTS_NAME).stat().st_size
    layers = edited_layers(edited.layout.blocks_path, edit.components)
    (directory / CARD_NAME).write_text(render_card(edit, weight_bytes, card_metrics, layers), encoding="utf-8")
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file())


def load_edit_dir(directory: Path):
    """Read an edit directory: `(config, components, requests, fingerprint, stats)`, with typed errors."""
    data = read_config_file(directory)
    try:
        config = EditConfig.from_dict(data)
    except EditConfigError as error:
        raise ArtifactError(f"{directory}: {error}") from error
    modules = data.get("edit_modules")
    fingerprint = data.get("base_model_fingerprint")
    if not isinstance(modules, dict) or not isinstance(fingerprint, dict):
        raise ArtifactError(
            f"{directory / 'edit_config.json'} lacks 'edit_modules' or 'base_model_fingerprint': it is a bare config, "
            "not a saved edit. Save edits with EditedModel.save_pretrained."
        )
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path} is missing: the artifact is incomplete; save or download it again.")
    expected = data.get("weights_sha256")
    if expected is not None and file_sha256(weights_path) != expected:
        raise ArtifactError(
            f"{weights_path} does not match the SHA-256 recorded in edit_config.json: the file is corrupted or was "
            "replaced; save or download the artifact again."
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ArtifactError(
            f"{weights_path} cannot be read ({error}): the file is truncated or corrupted; save or download it again."
        ) from error
    components = {}
    for path, entries in modules.items():
        comps = []
        for index, entry in enumerate(entries):
            names = entry.get("tensors", [])
            missing = [n for n in names if f"{path}.{index}.{n}" not in tensors]
            if missing:
                raise ArtifactError(f"{weights_path} lacks the tensors {missing} of {path}; the artifact is corrupted.")
            state = {n: tensors[f"{path}.{index}.{n}"] for n in names}
            try:
                comps.append(component_from_state(entry["kind"], state, entry.get("meta", {})))
            except (ValueError, KeyError, RuntimeError) as error:
                kind = entry.get("kind")
                raise ArtifactError(f"The saved {kind} component of {path} is malformed: {error}") from error
        components[path] = comps
    requests = read_requests(directory / REQUESTS_NAME)
    return config, components, requests, fingerprint, data.get("edit_stats") or {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_requests(path: Path) -> list[EditRequest]:
    if not path.is_file():
        return []
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                requests.append(EditRequest.from_dict(json.loads(line)))
            except json.JSONDecodeError as error:
                raise ArtifactError(f"{path}, line {number}, is not valid JSON: {error}") from error
    return requests


def edited_layers(blocks_path: str, module_paths) -> list[int]:
    """The block indices that the modules at `module_paths` belong to (`"model.layers.3.mlp.down_proj"` -> 3)."""
    prefix = f"{blocks_path}."
    heads = [path[len(prefix) :].split(".")[0] for path in module_paths if path.startswith(prefix)]
    return sorted({int(head) for head in heads if head.isdigit()})


def render_card(edit, weight_bytes: int, metrics: dict | None = None, layers: list[int] | None = None) -> str:
    """The model card of an edit: YAML metadata for the Hub, then a description rendered from the template.

    `layers` are the blocks the edit changes; by default the config's `layers`, which is `None` when the method chose.
    """
    from jinja2 import Template

    config = edit.config
    base = config.base_model_name_or_path
    metadata = {
        "library_name": "hf-knowedit",
        "tags": ["hf-knowedit", "knowledge-editing", config.edit_type],
        "edit_method": config.edit_type,
        "edited_layers": layers if layers is not None else config.layers,
        "edited_modules": sorted(edit.components),
        "num_requests": len(edit.requests),
    }
    if base and not Path(base).expanduser().is_absolute() and not Path(base).exists():  # a Hub id, not a path
        metadata["base_model"] = base
    if metrics:
        metadata["edit_metrics"] = metrics
    template = Template(resources.files("hf_knowedit.hub_cards").joinpath(CARD_TEMPLATE).read_text(encoding="utf-8"))
    body = template.render(
        edit_type=config.edit_type,
        base_model=base or "unknown",
        revision=config.revision,
        config_json=dump_json(config.to_dict()).strip(),
        modules={path: [c.kind for c in comps] for path, comps in edit.components.items()},
        requests=edit.requests[:MAX_CARD_REQUESTS],
        num_requests=len(edit.requests),
        weight_bytes=weight_bytes,
        metrics=metrics or edit.stats.get("metrics"),
        version=__version__,
    )
    return "---\n" + yaml.safe_dump(metadata, sort_keys=True, allow_unicode=True) + "---\n" + body
