"""lily-ssm: Lily (Low-Rank Interconnected Adaptation across Layers) for Mamba / SSMs, and a LoRA baseline."""

from .interop.push import push_adapter
from .persistence import AdapterLoadError, convert_adapter, load_adapter, save_adapter
from .report import ParameterReport, parameter_report
from .tuners import LilyConfig, LoraConfig, apply_adapter, merge_adapter
from .tuners.liveness import DeadAdapterError

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError", "DeadAdapterError", "LilyConfig", "LoraConfig", "ParameterReport", "apply_adapter",
    "convert_adapter", "load_adapter", "merge_adapter", "parameter_report", "push_adapter", "save_adapter",
]
