from ...config import register_edit_method
from .codebook import GraceCodebook
from .config import GRACEConfig
from .editor import GRACEEditor


register_edit_method("grace", GRACEConfig, GRACEEditor)

__all__ = ["GRACEConfig", "GRACEEditor", "GraceCodebook"]
