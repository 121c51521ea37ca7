from ...config import register_edit_method
from .config import ROMEConfig
from .editor import ROMEEditor


register_edit_method("rome", ROMEConfig, ROMEEditor)

__all__ = ["ROMEConfig", "ROMEEditor"]
