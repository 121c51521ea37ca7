from ...config import register_edit_method
from .config import IKEConfig
from .editor import IKEEditor
from .memory import InContextMemory


register_edit_method("ike", IKEConfig, IKEEditor)

__all__ = ["IKEConfig", "IKEEditor", "InContextMemory"]
