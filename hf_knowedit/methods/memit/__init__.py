from ...config import register_edit_method
from .config import MEMITConfig
from .editor import MEMITEditor


register_edit_method("memit", MEMITConfig, MEMITEditor)

__all__ = ["MEMITConfig", "MEMITEditor"]
