from ...config import register_edit_method
from .config import TPatcherConfig
from .editor import TPatcherEditor


register_edit_method("tpatcher", TPatcherConfig, TPatcherEditor)

__all__ = ["TPatcherConfig", "TPatcherEditor"]
