from ...config import register_edit_method
from .config import FTConfig
from .editor import FTEditor


register_edit_method("ft", FTConfig, FTEditor)

__all__ = ["FTConfig", "FTEditor"]
