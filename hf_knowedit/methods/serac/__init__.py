from ...config import register_edit_method
from ...training import register_trainable_editor
from .config import SERACConfig
from .editor import SERACEditor, SERACTrainingSpec
from .memory import SERACMemory
from .scope import ScopeClassifier


register_edit_method("serac", SERACConfig, SERACEditor)
register_trainable_editor("serac", SERACTrainingSpec)

__all__ = ["SERACConfig", "SERACEditor", "SERACMemory", "SERACTrainingSpec", "ScopeClassifier"]
