from .config import LoraConfig
from .layer import LoraPool

__all__ = ["LoraConfig", "LoraPool"]
