"""Adapters on disk: lily-ssm's folders (written and read), PEFT's (read, and written where PEFT can express the
adapter), local or on the Hugging Face Hub."""

from ..utils.safe_load import AdapterLoadError
from .native import (
    CONFIG_NAME,
    SAVE_FORMATS,
    WEIGHTS_NAME,
    check_adapter_folder,
    load_adapter,
    read_adapter,
    save_adapter,
)

__all__ = ["AdapterLoadError", "CONFIG_NAME", "SAVE_FORMATS", "WEIGHTS_NAME", "check_adapter_folder", "load_adapter",
           "read_adapter", "save_adapter"]
