from .config import LilyConfig
from .layer import LilyPool

__all__ = ["LilyConfig", "LilyPool"]
