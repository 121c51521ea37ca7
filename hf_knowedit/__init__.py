"""hf-knowedit: knowledge editing for Hugging Face models, with small, reversible, shareable edits.

>>> from hf_knowedit import get_edited_model, FTConfig, EditRequest
"""

from .architectures import ModelLayout, register_architecture, resolve_layout
from .config import EDIT_METHODS, EditConfig, register_edit_method
from .data import DatasetFormatError, DatasetSelectionError, load_edit_dataset
from .deltas import DenseDelta, EditComponent, LowRankDelta, SparseDelta, WeightDelta, register_component
from .edited_model import EditedModel, get_edited_model
from .editor import BaseEditor
from .errors import (
    ArchitectureNotSupportedError,
    ArtifactError,
    BaseModelMismatchError,
    EditConfigError,
    EditFailedError,
    EditNotFoundError,
    EditRequestError,
    KnowEditError,
)
from .methods.ft import FTConfig
from .modeling import load_default_model, load_model_and_tokenizer
from .requests import EditRequest, EvalPrompt
from .version import __version__


__all__ = [
    "__version__",
    "ArchitectureNotSupportedError",
    "ArtifactError",
    "BaseEditor",
    "BaseModelMismatchError",
    "DatasetFormatError",
    "DatasetSelectionError",
    "DenseDelta",
    "EDIT_METHODS",
    "EditComponent",
    "EditConfig",
    "EditConfigError",
    "EditFailedError",
    "EditNotFoundError",
    "EditRequest",
    "EditRequestError",
    "EditedModel",
    "EvalPrompt",
    "FTConfig",
    "KnowEditError",
    "LowRankDelta",
    "ModelLayout",
    "SparseDelta",
    "WeightDelta",
    "get_edited_model",
    "load_default_model",
    "load_edit_dataset",
    "load_model_and_tokenizer",
    "register_architecture",
    "register_component",
    "register_edit_method",
    "resolve_layout",
]
