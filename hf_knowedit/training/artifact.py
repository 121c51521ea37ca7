"""A trained editor as an artifact: `editor_config.json`, `editor_weights.safetensors` and a `README.md` card.

The config holds the method's config, the base model's fingerprint (of the weights the editor writes), the edited
modules and layers, and the training figures. The weights are the `state_dict` of the spec's editor network. Nothing
is unpickled when loading: tensors go through safetensors, everything else through JSON.
"""

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import EditConfig
from ..devices import input_device
from ..errors import ArtifactError, BaseModelMismatchError, EditConfigError
from ..fingerprint import check_fingerprint, model_fingerprint, tensors_sha256
from ..hub import atomic_directory, push_folder_to_hub, resolve_artifact_dir
from ..utils import dump_json, get_logger, write_json
from ..version import __version__
from .spec import TrainableEditorSpec, get_trainable_editor


logger = get_logger(__name__)

ARTIFACT_TYPE = "trained_editor"
EDITOR_CONFIG_NAME = "editor_config.json"
EDITOR_WEIGHTS_NAME = "editor_weights.safetensors"
CARD_NAME = "README.md"
UNTRAINED = "untrained"
FINAL_SUBFOLDER = "editor"


@dataclass
class TrainedEditor:
    """The trained network of a learned editing method (MEND, KE, ...), tied to one base model and layer set.

    Args:
        method (`str`): the edit method, e.g. `"mend"`.
        config (`EditConfig`): the method config the editor was trained with (network sizes, layers, ...).
        state_dict (`dict[str, torch.Tensor]`): the editor network's tensors.
        metadata (`dict`): `base_model_fingerprint`, `edited_modules`, `layers` and `training` figures.

    Example:

    ```python
    >>> from hf_knowedit.training import TrainedEditor
    >>> editor = TrainedEditor.from_pretrained("runs/mend-smollm/editor", model=model)  # doctest: +SKIP
    >>> MENDConfig(editor="runs/mend-smollm/editor")  # doctest: +SKIP
    ```
    """

    method: str
    config: EditConfig
    state_dict: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: TrainableEditorSpec, trainable: nn.Module, training: dict | None = None):
        """Snapshot a spec's editor network with the fingerprint of its base model."""
        state = {k: v.detach().cpu().clone().contiguous() for k, v in trainable.state_dict().items()}
        metadata = {
            **spec.artifact_metadata(),
            "base_model_fingerprint": model_fingerprint(spec.model, spec.fingerprint_tensors()),
            "training": training or {},
        }
        return cls(spec.config.edit_type, spec.config, state, metadata)

    # -- use -------------------------------------------------------------------------------------------------------
    def check_compatible(self, model: nn.Module) -> None:
        """Raise :class:`BaseModelMismatchError` unless `model` is the base model the editor was trained on."""
        fingerprint = self.metadata.get("base_model_fingerprint", {})
        what = f"{self.method} editor"
        saved_type, model_type = fingerprint.get("model_type"), getattr(model.config, "model_type", None)
        if saved_type and model_type and saved_type != model_type:
            raise BaseModelMismatchError(
                f"This {what} was trained for a {saved_type} model ({fingerprint.get('name_or_path')}), not for the "
                f"{model_type} model given. Train an editor for this model with `hf-knowedit train-editor`."
            )
        tensors = {}
        for name in fingerprint.get("tensors", {}):
            path, _, attribute = name.rpartition(".")
            try:
                tensors[name] = getattr(model.get_submodule(path), attribute)
            except AttributeError:
                raise BaseModelMismatchError(
                    f"This {what} writes {name!r}, which the model given does not have; it was trained for "
                    f"{fingerprint.get('name_or_path')}."
                ) from None
        check_fingerprint(fingerprint, model, tensors, what=what)

    def build(self, model: nn.Module, tokenizer, config: EditConfig | None = None):
        """The spec and the loaded editor network for `model`, after checking base model and layer set.

        `config`, when given, is the config the user edits with: its `layers`, if set, must be the trained ones.
        """
        self.check_compatible(model)
        trained_layers = self.metadata.get("layers")
        if config is not None and config.layers is not None and list(config.layers) != list(trained_layers or []):
            raise BaseModelMismatchError(
                f"This {self.method} editor was trained for the layers {trained_layers}, but the config "
                f"asks for layers {config.layers}. Leave layers=None to use the trained ones, or train an editor for "
                "these layers."
            )
        spec = get_trainable_editor(self.method)(self.config, model, tokenizer)
        if spec.edited_module_paths() != list(self.metadata.get("edited_modules", spec.edited_module_paths())):
            raise BaseModelMismatchError(
                f"This {self.method} editor edits {self.metadata.get('edited_modules')}, but on this model its config "
                f"resolves to {spec.edited_module_paths()}: it was trained for another layer set or architecture."
            )
        trainable = spec.build_trainable()
        try:
            trainable.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            raise ArtifactError(f"The {self.method} editor's weights do not fit its network: {error}") from error
        device = input_device(model)
        return spec, trainable.to(device).eval()

    # -- save and load ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the editor atomically: nothing half-written is ever left at `save_directory`."""
        from safetensors.torch import save_file

        config = {
            "artifact_type": ARTIFACT_TYPE,
            "method": self.method,
            "config": self.config.to_dict(),
            **self.metadata,
        }
        with atomic_directory(save_directory) as staging:
            save_file(self.state_dict, str(staging / EDITOR_WEIGHTS_NAME), metadata={
                "format": "pt", "hf_knowedit_version": __version__, "artifact_type": ARTIFACT_TYPE,
            })
            write_json(staging / EDITOR_CONFIG_NAME, config)
            (staging / CARD_NAME).write_text(self._card(), encoding="utf-8")

    def _card(self) -> str:
        fingerprint = self.metadata.get("base_model_fingerprint", {})
        training = self.metadata.get("training", {})
        header = dump_json({"library_name": "hf-knowedit", "tags": ["knowledge-editing", "hf-knowedit", self.method],
                            "base_model": fingerprint.get("name_or_path")})
        config_class = type(self.config).__name__
        return (
            f"---\n{header.strip()}\n---\n\n# {self.method.upper()} editor for {fingerprint.get('name_or_path')}\n\n"
            f"A trained {self.method.upper()} editor network for `{fingerprint.get('name_or_path')}` "
            f"({fingerprint.get('model_type')}), editing {', '.join(self.metadata.get('edited_modules', []))} "
            f"(layers {self.metadata.get('layers')}). Trained with hf-knowedit {__version__} for "
            f"{training.get('steps')} steps on {training.get('num_train_requests')} requests of "
            f"`{training.get('dataset')}` (final status: {training.get('status')}).\n\n"
            f"```python\nfrom hf_knowedit import get_edited_model, {config_class}\n"
            f"edited = get_edited_model(model, {config_class}(editor=\"<repo id or path>\"), requests, "
            "tokenizer=tokenizer)\n```\n\nThe editor refuses any other base model or layer set "
            "(`BaseModelMismatchError`).\n"
        )

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, model: nn.Module | None = None,
                        **hub_kwargs) -> "TrainedEditor":
        """Load an editor saved by :meth:`save_pretrained` (a directory, a training run's output, or a Hub repo id).

        With `model`, the base model is checked at once (:class:`BaseModelMismatchError`).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = editor_directory(path_or_repo_id, **hub_kwargs)
        config_file, weights_file = directory / EDITOR_CONFIG_NAME, directory / EDITOR_WEIGHTS_NAME
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
            tensors = load_file(str(weights_file))
        except (json.JSONDecodeError, SafetensorError, OSError, UnicodeDecodeError) as error:
            raise ArtifactError(f"The editor at {directory} is damaged ({error}); save or download it again.") \
                from error
        if not isinstance(data, dict) or data.get("artifact_type") != ARTIFACT_TYPE or "method" not in data:
            raise ArtifactError(f"{config_file} does not describe an hf-knowedit trained editor.")
        method = data.pop("method")
        spec_cls = get_trainable_editor(method)
        config = spec_cls.config_class.from_dict(data.pop("config"))
        for key in ("artifact_type", "hf_knowedit_version"):
            data.pop(key, None)
        editor = cls(method, config, tensors, data)
        if model is not None:
            editor.check_compatible(model)
        return editor

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, revision: str | None = None, create_pr: bool = False):
        """Save to a temporary directory and upload it to the Hub repo `repo_id` (created if needed)."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "editor"
            self.save_pretrained(folder)
            return push_folder_to_hub(
                folder, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                commit_message=commit_message or f"Upload {self.method} editor with hf-knowedit",
            )


def editor_directory(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> Path:
    """The local directory of a trained editor: a saved editor, the output folder of a training run (its `editor/`
    subfolder), or the snapshot of a Hub repo. Raises :class:`ArtifactError` when it holds no editor."""
    directory = resolve_artifact_dir(path_or_repo_id, **hub_kwargs)
    final = directory / FINAL_SUBFOLDER
    if not (directory / EDITOR_CONFIG_NAME).is_file() and (final / EDITOR_CONFIG_NAME).is_file():
        directory = final
    if not (directory / EDITOR_CONFIG_NAME).is_file() or not (directory / EDITOR_WEIGHTS_NAME).is_file():
        raise ArtifactError(
            f"{directory} is not a trained-editor directory: it needs {EDITOR_CONFIG_NAME} and "
            f"{EDITOR_WEIGHTS_NAME}. Train one with `hf-knowedit train-editor --method ... --output DIR`."
        )
    return directory


def editor_identity(path_or_repo_id: str | os.PathLike, **hub_kwargs) -> dict:
    """What tells one trained editor from another: a SHA-256 of its weights by content
    (:func:`~hf_knowedit.fingerprint.tensors_sha256`: equal for the same tensors, as training the same steps again
    gives, though the file's bytes differ) and its training's steps and status. Two editors trained in the same place,
    say `runs/mend-smollm2` before and after training it again, differ here while the configs that name them do not;
    evaluation runs record it (see `hf_knowedit.evaluation`).

    Example:

    ```python
    >>> import tempfile
    >>> from hf_knowedit import EditRequest
    >>> from hf_knowedit.training import EditorTrainingArguments, train_editor
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> requests = [EditRequest(prompt="{} plays the", subject=name, target_new="violin") for name in "ABC"]
    >>> result = train_editor("mend", tiny_model("gpt2"), tiny_tokenizer(), requests, tempfile.mkdtemp(),
    ...                       args=EditorTrainingArguments(batch_size=2, validation_size=1), max_steps=1)
    >>> identity = editor_identity(result.editor_dir)
    >>> identity["steps"], identity["status"], len(identity["sha256"])
    (1, 'completed', 64)

    ```
    """
    editor = TrainedEditor.from_pretrained(path_or_repo_id, **hub_kwargs)
    training = editor.metadata.get("training") or {}
    return {"sha256": tensors_sha256(editor.state_dict), "steps": training.get("steps"),
            "status": training.get("status")}


def load_editor_for(config: EditConfig, model: nn.Module, tokenizer):
    """The spec and editor network that `config.editor` names, ready to edit `model`.

    `config.editor` is a directory or Hub repo id of a trained editor, or `"untrained"` for the freshly initialised
    network (a baseline, and for tests). `None` raises :class:`EditConfigError` telling how to train one.
    """
    method = config.edit_type
    source = getattr(config, "editor", None)
    if source is None:
        raise EditConfigError(
            f"{type(config).__name__}.editor is None: {method.upper()} edits with a trained editor network. Train one "
            f"with `hf-knowedit train-editor --method {method} --dataset FILE --output DIR` (or "
            f"hf_knowedit.training.train_editor) and pass {type(config).__name__}(editor=\"DIR\"), or pass "
            f"editor=\"{UNTRAINED}\" for the untrained network (a baseline)."
        )
    if source == UNTRAINED:
        spec = get_trainable_editor(method)(config, model, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            trainable = spec.build_trainable()
        return spec, trainable.to(input_device(model)).eval()
    return TrainedEditor.from_pretrained(source).build(model, tokenizer, config)
