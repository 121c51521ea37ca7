"""Edit configs and the registry of editing methods.

Every method is a dataclass subclass of :class:`EditConfig` plus an editor class, tied together by
:func:`register_edit_method`. Outside packages can register their own methods the same way.
"""

import dataclasses
import functools
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .errors import ArtifactError, EditConfigError
from .utils import get_logger, write_json


logger = get_logger(__name__)

CONFIG_NAME = "edit_config.json"
# Keys an artifact's edit_config.json holds besides the config's own fields.
ARTIFACT_KEYS = (
    "hf_knowedit_version", "base_model_fingerprint", "edit_modules", "num_requests", "edit_stats", "weights_sha256"
)

EDIT_METHODS: dict[str, tuple[type["EditConfig"], type]] = {}


@dataclass
class EditConfig:
    """Base class of every editing method's config.

    Args:
        layers (`list[int]`, *optional*, defaults to `None`):
            Indices of the transformer blocks to edit. `None` lets the method choose from the model's depth, so the
            defaults work on every supported architecture.
        base_model_name_or_path (`str`, *optional*, defaults to `None`):
            The base model the edit was made on; filled in when the edit is made.
        revision (`str`, *optional*, defaults to `None`):
            The base model's revision (commit hash on the Hub), when known.
    """

    edit_type: ClassVar[str] = ""

    layers: list[int] | None = field(
        default=None, metadata={"help": "Transformer blocks to edit; None chooses from the model's depth."}
    )
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "The base model of the edit."})
    revision: str | None = field(default=None, metadata={"help": "The base model's revision, when known."})

    def __post_init__(self):
        for name, value in _ints_as_floats(type(self), vars(self)).items():  # 1 and 1.0 alike in saved configs
            setattr(self, name, value)
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            layers = list(self.layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise EditConfigError(
                    f"{type(self).__name__}.layers must be a non-empty list of layer indices or None, "
                    f"got {self.layers!r}."
                )
            if any(i < 0 for i in layers):
                raise EditConfigError(
                    f"{type(self).__name__}.layers must hold non-negative layer indices, got {layers}; "
                    "count layers from 0."
                )
            if len(set(layers)) != len(layers):
                raise EditConfigError(f"{type(self).__name__}.layers has duplicates: {layers}.")
            self.layers = sorted(layers)

    # -- serialisation ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config's fields and its `edit_type`, JSON-ready."""
        data = dataclasses.asdict(self)
        data["edit_type"] = self.edit_type
        return data

    def save_pretrained(self, save_directory: str | os.PathLike, **extra: Any) -> None:
        """Write `edit_config.json` (indented, sorted keys, version stamp) into `save_directory`."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        write_json(Path(save_directory) / CONFIG_NAME, {**self.to_dict(), **extra})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditConfig":
        """Build the config of `data["edit_type"]` (or of `cls`), dropping unknown keys with a warning.

        Called on a method's class, it refuses a config of another method with :class:`EditConfigError`.
        """
        data = dict(data)
        edit_type = data.pop("edit_type", None) or cls.edit_type
        target = get_config_class(edit_type) if edit_type else cls
        if cls is not EditConfig and target is not cls:
            raise EditConfigError(
                f"This is a config of the method {edit_type!r}, not {cls.edit_type!r}. Load it with "
                f"{target.__name__}.from_pretrained or hf_knowedit.EditConfig.from_pretrained."
            )
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = sorted(k for k in data if k not in names and k not in ARTIFACT_KEYS)
        if unknown:
            logger.warning("Ignoring unknown keys in the %s config: %s", edit_type, unknown)
        return target(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs):
        """Load a config from a directory holding `edit_config.json`, or from a Hub repo id."""
        from .hub import resolve_artifact_dir

        directory = resolve_artifact_dir(path_or_repo_id, subfolder=subfolder, **hub_kwargs)
        return cls.from_dict(read_config_file(directory))

    def resolve_layers(self, layout) -> list[int]:
        """The layers to edit on a model of `layout`: the configured ones (checked) or the method's default."""
        if self.layers is None:
            return self.default_layers(layout)
        for layer in self.layers:
            layout.check_layer(layer, field=f"{type(self).__name__}.layers")
        return list(self.layers)

    @property
    def raises_target_new(self) -> bool:
        """Whether the edit aims to make `target_new` more likely (the half-precision check tests that it did); a
        method that erases knowledge instead returns `False`."""
        return True

    def default_layers(self, layout) -> list[int]:
        """The layers a method edits when `layers` is None; methods override this."""
        return layout.default_layers()


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed `edit_config.json` of an artifact directory, with clear errors when missing or corrupted."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist: {directory} is not an hf-knowedit edit artifact.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}); the artifact is corrupted, save it again.") from error
    if not isinstance(data, dict) or "edit_type" not in data:
        raise ArtifactError(f"{path} has no 'edit_type'; it is not an hf-knowedit edit config.")
    return data


def register_edit_method(name: str, config_cls: type[EditConfig], editor_cls: type) -> None:
    """Register an editing method under `name`, so configs of that `edit_type` resolve to `editor_cls`.

    Example:

    ```python
    >>> import hf_knowedit
    >>> from hf_knowedit import register_edit_method, FTConfig
    >>> from hf_knowedit.methods.ft import FTEditor
    >>> register_edit_method("ft", FTConfig, FTEditor)  # what hf_knowedit.methods.ft does on import
    >>> hf_knowedit.EDIT_METHODS["ft"] == (FTConfig, FTEditor)
    True

    ```
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, EditConfig)):
        raise TypeError(f"config_cls must subclass EditConfig, got {config_cls!r}.")
    if config_cls.edit_type != name:
        raise EditConfigError(f"{config_cls.__name__}.edit_type is {config_cls.edit_type!r}, registered as {name!r}.")
    EDIT_METHODS[name] = (config_cls, editor_cls)


@functools.cache
def _float_field_names(config_cls: type) -> tuple[str, ...]:
    """The fields of `config_cls` typed `float`, `float | None` or `Optional[float]` (not also `int`). String
    annotations (a module with `from __future__ import annotations`) are resolved in the module of the class that
    declares the field; a field whose annotation names something defined only for type checkers is not a float
    field."""
    names = []
    for f in dataclasses.fields(config_cls):
        hint = f.type
        if isinstance(hint, str):
            # the class that declares the field; a class that keeps no `__annotations__` (made lazily since Python
            # 3.14 for string annotations without the __future__ import) counts as declaring it
            owner = next((c for c in config_cls.__mro__ if f.name in vars(c).get("__annotations__", {})), config_cls)
            try:  # as typing.get_type_hints does, one field at a time: one unresolvable name spoils no other field
                hint = eval(hint, dict(vars(sys.modules[owner.__module__])))
            except Exception:  # noqa: BLE001 - a name imported under TYPE_CHECKING only: not a float field
                continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        if float in kinds and int not in kinds:
            names.append(f.name)
    return tuple(names)


def _ints_as_floats(config_cls: type, values: dict[str, Any]) -> dict[str, float]:
    """The ints of `values` given for float fields of `config_cls`, as floats (labels, saved configs and comparisons
    then read 1 and 1.0 alike)."""
    floats = {}
    for name in _float_field_names(config_cls):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                floats[name] = float(value)
            except OverflowError:
                raise EditConfigError(
                    f"{config_cls.__name__}.{name} is too large for a float (about 2**{value.bit_length()})."
                ) from None
    return floats


def get_config_class(edit_type: str) -> type[EditConfig]:
    return _lookup(edit_type)[0]


def get_editor_class(edit_type: str) -> type:
    return _lookup(edit_type)[1]


def _lookup(edit_type: str):
    if edit_type not in EDIT_METHODS:
        raise EditConfigError(
            f"Unknown edit method {edit_type!r}; registered methods: {sorted(EDIT_METHODS)}. Register new ones with "
            "hf_knowedit.register_edit_method(name, ConfigClass, EditorClass)."
        )
    return EDIT_METHODS[edit_type]


def with_default_fields(edit_type, data, leave_out: tuple[str, ...] = ()):
    """A stored config dict of `edit_type` with the fields its config class gained since it was stored, at their
    defaults (none of `leave_out`), and an int stored for a float field as that float: what a config written by an
    older version means to this one. Anything that is not a dict of a registered method comes back as it is.

    >>> with_default_fields("kn", {"steps": 4})["layers_per_pass"]
    8
    >>> with_default_fields("ft", {"lr": 1})["lr"]
    1.0
    """
    if not isinstance(data, dict) or not isinstance(edit_type, str) or edit_type not in EDIT_METHODS:
        return data
    config_cls = get_config_class(edit_type)
    added = {}
    for spec in dataclasses.fields(config_cls):
        if spec.init and spec.name not in data and spec.name not in leave_out:
            if spec.default is not dataclasses.MISSING:
                added[spec.name] = spec.default
            elif spec.default_factory is not dataclasses.MISSING:
                added[spec.name] = spec.default_factory()
    return {**added, **data, **_ints_as_floats(config_cls, data)}


def build_config(
    method: str | None,
    config: "dict | str | os.PathLike | None" = None,
    overrides: dict[str, Any] | None = None,
) -> EditConfig:
    """The config of `method` from a dict, a JSON file or a saved edit's folder, with `overrides` applied.

    The base model's name and revision recorded in a saved edit are dropped: they are filled in when editing. The
    method may come from `config`'s `edit_type` alone; when both are given they must agree.

    Example:

    ```python
    >>> from hf_knowedit.config import build_config
    >>> build_config("ft", overrides={"variant": "ft_l", "num_steps": 5}).norm_constraint
    0.0005

    ```
    """
    data: dict[str, Any] = {}
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser()
        if path.is_dir():
            data = read_config_file(path)
        elif path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise EditConfigError(f"The config file {path} is not valid JSON: {error}") from None
            if not isinstance(data, dict):
                raise EditConfigError(f"The config file {path} must hold a JSON object of config fields.")
        else:
            raise EditConfigError(f"The config {path} does not exist; give a JSON file or a saved edit's folder.")
    elif isinstance(config, dict):
        data = dict(config)
    elif config is not None:
        raise EditConfigError(f"config must be a dict or a path, got {type(config).__name__}.")
    for key in ("base_model_name_or_path", "revision", *ARTIFACT_KEYS):
        data.pop(key, None)
    file_method = data.pop("edit_type", None)
    if method and file_method and file_method != method:
        raise EditConfigError(
            f"The config {config} is a config of the method {file_method!r}, not {method!r}; give a config of that "
            "method, or leave the method out."
        )
    method = method or file_method
    if not method:
        raise EditConfigError("Give the method (e.g. 'ft'), or a config whose 'edit_type' names it.")
    config_cls = get_config_class(method)
    names = sorted(f.name for f in dataclasses.fields(config_cls) if f.init)
    for key, value in (overrides or {}).items():
        if key not in names:
            raise EditConfigError(f"{config_cls.__name__} has no field {key!r}; its fields are {names}.")
        data[key] = value
    try:
        return EditConfig.from_dict({**data, "edit_type": method})
    except TypeError as error:  # a value of the wrong type that the config's own checks did not catch
        raise EditConfigError(f"Invalid {config_cls.__name__} fields: {error}") from None
