from ...config import register_edit_method
from .config import CaliNETConfig
from .editor import CaliNETEditor
from .side_ffn import SideFFN


register_edit_method("calinet", CaliNETConfig, CaliNETEditor)

__all__ = ["CaliNETConfig", "CaliNETEditor", "SideFFN"]
