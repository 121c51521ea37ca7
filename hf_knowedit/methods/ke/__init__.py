from ...config import register_edit_method
from ...training import register_trainable_editor
from .config import KEConfig
from .editor import KEEditor, KETrainingSpec
from .network import KEHypernetwork


register_edit_method("ke", KEConfig, KEEditor)
register_trainable_editor("ke", KETrainingSpec)

__all__ = ["KEConfig", "KEEditor", "KEHypernetwork", "KETrainingSpec"]
