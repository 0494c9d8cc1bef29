"""``lily-ssm env``: the facts a bug report needs, in lines to paste (as ``transformers env`` and ``accelerate env``).

Versions of Python, torch, CUDA and the GPU; whether ``mamba-ssm`` / ``causal-conv1d`` / ``flash-linear-attention``
import (and why not); which
scan and convolution each model family takes on each device; and which installed packages fall outside the ranges
lily-ssm declares (read from its own package metadata, or its ``pyproject.toml`` when run from a checkout).
"""

from __future__ import annotations

import importlib.metadata as metadata
import platform
import re
import sys
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version

# The packages whose ranges lily-ssm declares and tests at both ends (docs/install.md).
CHECKED = ("torch", "transformers", "accelerate", "safetensors", "datasets", "huggingface-hub", "peft", "lm-eval",
           "mamba-ssm", "causal-conv1d")
FAMILIES = {  # family -> (its scan, the kernel it runs on CUDA, the training core's kernel if another)
    "Mamba-1 (Mamba, Falcon-Mamba, Jamba, Vim)": ("selective scan", "selective_scan_fn", "selective_scan_cuda"),
    "Mamba-2 (Mamba2, Bamba, Falcon-H1, Nemotron-H, Zamba2, Granite 4.0)": ("SSD scan", "mamba_chunk_scan_combined",
                                                                            None),
}
# The hybrids' recurrent layers run transformers' own forwards (they call every projection as a module): family ->
# (its recurrence, flash-linear-attention's kernel for it, or None for a convolution only). transformers takes
# flash-linear-attention and causal-conv1d where they import and the tensors are on CUDA, its PyTorch code elsewhere.
HYBRID_FAMILIES = {
    "Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid)": ("gated delta rule", "chunk_gated_delta_rule"),
    "Kimi Delta Attention (Kimi Linear)": ("gated delta rule with per-channel decay", "chunk_kda"),
    "Gated short convolution (LFM2, LFM2-MoE)": (None, None),
}


def declared_requirements() -> list[Requirement]:
    """lily-ssm's declared requirements (every extra's too): from the installed package, else ``pyproject.toml``."""
    try:
        lines = metadata.requires("lily-ssm") or []
    except metadata.PackageNotFoundError:
        lines = _pyproject_requirements()
    found = []
    for line in lines:
        requirement = Requirement(line)
        requirement.marker = None  # an extra's requirement is still a declared range
        found.append(requirement)
    return found


def _pyproject_requirements() -> list[str]:
    """The dependencies and every extra's from ``pyproject.toml`` (a source checkout without package metadata)."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    try:
        import tomllib
    except ImportError:  # Python 3.10: every quoted requirement of the [project] table and below
        return re.findall(r'"([A-Za-z0-9_.\-\[\]]+\s*[<>=!~][^"]*)"', text[text.find("[project]"):])
    project = tomllib.loads(text)["project"]
    return [*project.get("dependencies", []), *(r for extra in project.get("optional-dependencies", {}).values()
                                                for r in extra)]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def out_of_range(requirements: list[Requirement]) -> list[str]:
    """``name version (declared: range)`` for every installed package outside lily-ssm's declared range."""
    problems = []
    for name in CHECKED:
        version = installed_version(name)
        ranges = [r.specifier for r in requirements if _canonical(r.name) == _canonical(name)]
        if version is None or not ranges:
            continue
        plain = Version(version).base_version  # 2.11.0+cu130 is 2.11.0 for the range
        bad = [str(spec) for spec in ranges if not spec.contains(plain, prereleases=True)]
        if bad:
            problems.append(f"{name} {version} (declared: {', '.join(bad)})")
    return problems


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kernel_lines() -> list[str]:
    """Whether each optional CUDA package imports, and why not."""
    from .ops import kernels

    lines = []
    for package, probes in (("mamba-ssm", ("selective_scan_fn", "selective_scan_cuda", "mamba_chunk_scan_combined",
                                           "selective_state_update")),
                            ("causal-conv1d", ("causal_conv1d_fn", "causal_conv1d_update"))):
        version = installed_version(package)
        error = next((e for e in map(kernels.import_error, probes) if e is not None), None)
        state = "imports" if error is None else f"does not import ({error})"
        lines.append(f"{package}: {version or 'not installed'}, {state}")
    error = fla_import_error()
    lines.append(f"flash-linear-attention: {installed_version('flash-linear-attention') or 'not installed'}, "
                 + ("imports" if error is None else f"does not import ({error})"))
    return lines


def fla_import_error() -> str | None:
    """Why flash-linear-attention (``fla``, the hybrids' recurrence kernels) does not import, or None."""
    try:
        import fla  # noqa: F401
    except Exception as exc:  # an installed package can fail on its own imports (triton, CUDA)
        return f"{type(exc).__name__}: {exc}"
    return None


def path_lines(cuda: bool) -> list[str]:
    """Which scan and convolution each family takes on each device."""
    from .ops import kernels

    devices = ["cpu", "cuda"] if cuda else ["cpu", "cuda (no GPU visible here)"]
    conv = kernels.get("causal_conv1d_fn") is not None and kernels.get("causal_conv1d_update") is not None
    lines = []
    for family, (scan, kernel, training_kernel) in FAMILIES.items():
        for device in devices:
            if device == "cpu":
                lines.append(f"{family} on cpu: lily-ssm's PyTorch {scan} and convolution")
                continue
            have_scan = kernels.get(kernel) is not None and kernels.get("selective_state_update") is not None
            scan_text = f"mamba-ssm's {kernel}" if have_scan else f"lily-ssm's PyTorch {scan} (mamba-ssm missing)"
            if have_scan and training_kernel and kernels.get(training_kernel) is None:
                scan_text += f"; training falls back to the PyTorch scan ({training_kernel} missing)"
            conv_text = "causal-conv1d" if conv else "lily-ssm's PyTorch convolution (causal-conv1d missing)"
            lines.append(f"{family} on {device}: {scan_text}, {conv_text}")
    fla = fla_import_error() is None
    for family, (recurrence, kernel) in HYBRID_FAMILIES.items():
        for device in devices:
            parts = [] if recurrence is None else [
                f"flash-linear-attention's {kernel}" if fla and device != "cpu"
                else f"transformers' PyTorch {recurrence}" + ("" if device == "cpu" or fla
                                                              else " (flash-linear-attention missing)")]
            parts.append("causal-conv1d" if conv and device != "cpu" else "transformers' PyTorch convolution"
                         + ("" if device == "cpu" or conv else " (causal-conv1d missing)"))
            lines.append(f"{family} on {device}: transformers' forward (every projection a module), {', '.join(parts)}")
    return lines


def report() -> str:
    """The whole report, one fact per line."""
    import torch

    from .version import __version__

    lines = [f"lily-ssm: {__version__}", f"Python: {sys.version.split()[0]} ({platform.platform()})",
             f"torch: {torch.__version__}, CUDA {torch.version.cuda or 'none (a CPU build)'}"]
    cuda = torch.cuda.is_available()
    if cuda:
        for index in range(torch.cuda.device_count()):
            name, (major, minor) = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
            memory = torch.cuda.get_device_properties(index).total_memory / 2**30
            lines.append(f"GPU {index}: {name}, compute capability {major}.{minor}, {memory:.0f} GiB")
    else:
        lines.append("GPU: none visible to torch")
    for name in CHECKED[1:8]:
        lines.append(f"{name}: {installed_version(name) or 'not installed'}")
    lines += kernel_lines()
    lines += path_lines(cuda)
    requirements = declared_requirements()
    problems = out_of_range(requirements)
    if not requirements:
        lines.append("declared ranges: unknown (lily-ssm is neither installed nor run from its checkout)")
    else:
        lines.append("outside lily-ssm's declared ranges: " + ("; ".join(problems) if problems else "nothing"))
    return "\n".join(lines)


def main(args: Any = None) -> int:
    print(report())
    return 0
