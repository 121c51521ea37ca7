from ...config import register_edit_method
from .config import AlphaEditConfig
from .editor import AlphaEditEditor


register_edit_method("alphaedit", AlphaEditConfig, AlphaEditEditor)

__all__ = ["AlphaEditConfig", "AlphaEditEditor"]
