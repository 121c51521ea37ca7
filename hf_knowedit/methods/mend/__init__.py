from ...config import register_edit_method
from ...training import register_trainable_editor
from .config import MENDConfig
from .editor import MENDEditor, MENDTrainingSpec
from .network import MENDEditorNetwork


register_edit_method("mend", MENDConfig, MENDEditor)
register_trainable_editor("mend", MENDTrainingSpec)

__all__ = ["MENDConfig", "MENDEditor", "MENDEditorNetwork", "MENDTrainingSpec"]
