"""hf-knowedit: knowledge editing for Hugging Face models, with small, reversible, shareable edits.

>>> from hf_knowedit import get_edited_model, FTConfig, EditRequest
"""

from .architectures import ModelLayout, register_architecture, resolve_layout, unregister_architecture
from .config import EDIT_METHODS, EditConfig, register_edit_method
from .data import DatasetFormatError, DatasetSelectionError, load_edit_dataset
from .deltas import DenseDelta, EditComponent, LowRankDelta, SparseDelta, WeightDelta, register_component
from .edited_model import MODEL_ROOT, EditedModel, ModelComponent, get_edited_model
from .editor import BaseEditor
from .errors import (
    ArchitectureNotSupportedError,
    ArtifactError,
    BaseModelMismatchError,
    ContradictoryRequestsError,
    CorpusNotFoundError,
    EditConfigError,
    EditFailedError,
    EditNotFoundError,
    EditRequestError,
    InsufficientTokensError,
    KnowEditError,
    SingularStatisticsError,
    StatisticsError,
)
from .evaluation import EvaluationSettings, run_evaluation
from .methods.alphaedit import AlphaEditConfig
from .methods.calinet import CaliNETConfig
from .methods.ft import FTConfig
from .methods.grace import GRACEConfig
from .methods.ike import IKEConfig
from .methods.ke import KEConfig
from .methods.kn import KNConfig
from .methods.memit import MEMITConfig
from .methods.mend import MENDConfig
from .methods.rome import ROMEConfig
from .methods.serac import SERACConfig
from .methods.tpatcher import TPatcherConfig
from .modeling import load_default_model, load_model_and_tokenizer
from .peft_export import export_peft_lora
from .requests import EditRequest, EvalPrompt
from .resumable import resumable_edits
from .scoring import BatchScorer
from .statistics import LayerStatistics, get_layer_statistics
from .training import EditorTrainingArguments, TrainedEditor, register_trainable_editor, train_editor
from .version import __version__


__all__ = [
    "__version__",
    "AlphaEditConfig",
    "ArchitectureNotSupportedError",
    "ArtifactError",
    "BaseEditor",
    "BaseModelMismatchError",
    "ContradictoryRequestsError",
    "BatchScorer",
    "CaliNETConfig",
    "CorpusNotFoundError",
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
    "EditorTrainingArguments",
    "EvalPrompt",
    "EvaluationSettings",
    "FTConfig",
    "GRACEConfig",
    "IKEConfig",
    "InsufficientTokensError",
    "KEConfig",
    "KNConfig",
    "KnowEditError",
    "LayerStatistics",
    "LowRankDelta",
    "MEMITConfig",
    "MENDConfig",
    "MODEL_ROOT",
    "ModelComponent",
    "ModelLayout",
    "ROMEConfig",
    "SERACConfig",
    "SingularStatisticsError",
    "SparseDelta",
    "StatisticsError",
    "TPatcherConfig",
    "TrainedEditor",
    "WeightDelta",
    "export_peft_lora",
    "get_edited_model",
    "get_layer_statistics",
    "load_default_model",
    "load_edit_dataset",
    "load_model_and_tokenizer",
    "register_architecture",
    "register_component",
    "register_edit_method",
    "register_trainable_editor",
    "resolve_layout",
    "resumable_edits",
    "run_evaluation",
    "train_editor",
    "unregister_architecture",
]
