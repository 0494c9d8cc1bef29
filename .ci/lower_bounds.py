"""Print pip constraints pinning the integrations lily-ssm reaches into to their declared lower bounds.

Read from pyproject.toml, so the bounds CI tests are the bounds users are promised. torch is left out: the
CPU build CI installs is 2.13.0 (the lower bound, 2.7, exists here only as a several-GB CUDA build).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PINNED = ("transformers", "peft", "lm-eval", "accelerate", "datasets", "huggingface_hub", "safetensors")


def lower_bounds(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*([^;]*)", requirement)
        name, spec = match.group(1), match.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if name in PINNED and low:
            bounds.setdefault(name, low.group(1))
    missing = sorted(set(PINNED) - set(bounds))
    if missing:
        sys.exit(f"pyproject.toml declares no lower bound for {', '.join(missing)}")
    return bounds


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for name, version in lower_bounds(root / "pyproject.toml").items():
        print(f"{name}=={version}")
