"""lily-ssm: Lily (Low-Rank Interconnected Adaptation across Layers) for Mamba / SSMs, and a LoRA baseline.

The public API is loaded on first use, so ``import lily_ssm.ops`` (or any lower layer) imports that layer
alone (docs/design.md §7).
"""

from __future__ import annotations

import importlib
from typing import Any

from .version import __version__ as __version__

_API = {
    "AdapterLoadError": "lily_ssm.persistence", "DeadAdapterError": "lily_ssm.tuners.liveness",
    "LilyConfig": "lily_ssm.tuners", "LoraConfig": "lily_ssm.tuners", "ParameterReport": "lily_ssm.tuners.report",
    "apply_adapter": "lily_ssm.tuners", "convert_adapter": "lily_ssm.interop.convert",
    "load_adapter": "lily_ssm.persistence", "merge_adapter": "lily_ssm.tuners",
    "parameter_report": "lily_ssm.tuners.report", "push_adapter": "lily_ssm.interop.push",
    "save_adapter": "lily_ssm.persistence",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lily_ssm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
