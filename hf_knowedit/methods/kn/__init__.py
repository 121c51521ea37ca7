from ...config import register_edit_method
from .config import KNConfig
from .editor import KNEditor


register_edit_method("kn", KNConfig, KNEditor)

__all__ = ["KNConfig", "KNEditor"]
