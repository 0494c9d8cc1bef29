"""Published upstream sources that tests run as numeric oracles, fetched from PyPI once, checked by hash and cached.

Not a test module. ``python tests/upstream_sources.py`` fetches them all (CI does this first, so a failed download
fails CI instead of skipping a test); a test calls :func:`fetch_or_skip` or :func:`published_or_skip`, which skip
with the reason when it cannot.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    filename: str
    url: str
    sha256: str


# mamba-ssm's own sdist: its modules, its PyTorch references (selective_scan_ref, ssd_minimal_discrete,
# rms_norm_ref) and MambaLMHeadModel.save_pretrained, the writer of the native checkpoint layout.
MAMBA_SSM = Source(
    "mamba_ssm-2.3.2.post1.tar.gz",
    "https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/"
    "mamba_ssm-2.3.2.post1.tar.gz",
    "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028",
)
# causal-conv1d's sdist: causal_conv1d_ref and causal_conv1d_update_ref, the definitions its kernels are tested against.
CAUSAL_CONV1D = Source(
    "causal_conv1d-1.7.0.tar.gz",
    "https://files.pythonhosted.org/packages/f4/d1/eba27735f31bd5527d39a3c7f693e6ded7b844cab275db719a15ad37b6cd/"
    "causal_conv1d-1.7.0.tar.gz",
    "3202758494eaa7b597ce1c282dfa188889506bfcb92cad3c407d26736bfcd32b",
)
SOURCES = (MAMBA_SSM, CAUSAL_CONV1D)


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    """``$LILY_SSM_UPSTREAM_CACHE``, else ``~/.cache/lily-ssm/upstream``."""
    default = Path.home() / ".cache" / "lily-ssm" / "upstream"
    return Path(os.environ.get("LILY_SSM_UPSTREAM_CACHE", default))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(source: Source, timeout: float = 60.0) -> Path:
    """The cached file for ``source``, downloaded (atomically, hash-checked) when absent."""
    target = cache_dir() / source.filename
    if target.is_file() and _digest(target) == source.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response:
            data = response.read()
    except OSError as error:
        raise FetchError(f"could not download {source.url}: {error}") from error
    if hashlib.sha256(data).hexdigest() != source.sha256:
        raise FetchError(f"{source.url} does not have the expected sha256 {source.sha256}")
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{source.filename}.")
    with os.fdopen(handle, "wb") as out:
        out.write(data)
    os.replace(temporary, target)
    return target


def published_functions(sdist: Path, path: str, names: tuple[str, ...]) -> dict[str, Callable]:
    """The functions ``names`` exactly as ``path`` (inside the sdist's top folder) defines them, compiled on their own,
    so the module's other imports (CUDA extensions, Triton) never run. They see ``torch``, ``F``, ``rearrange`` and
    ``repeat``, the globals the published references use."""
    import torch
    import torch.nn.functional as F
    from einops import rearrange, repeat

    with tarfile.open(sdist) as archive:
        top = sdist.name.removesuffix(".tar.gz")
        text = archive.extractfile(f"{top}/{path}").read().decode()
    found = [node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name in names]
    missing = set(names) - {node.name for node in found}
    if missing:
        raise LookupError(f"{sdist.name}:{path} defines no {', '.join(sorted(missing))}")
    namespace = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(ast.Module(body=found, type_ignores=[]), f"{sdist.name}/{path}", "exec"), namespace)
    return {name: namespace[name] for name in names}


def fetch_or_skip(source: Source, needs: tuple[str, ...] = ()) -> Path:
    """:func:`fetch` inside a test: skip, saying why, when a module in ``needs`` is not installed or the file is
    neither cached nor reachable."""
    import importlib.util

    import pytest

    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"running {source.filename}'s code needs {' and '.join(missing)} (the dev extra installs it)")
    try:
        return fetch(source)
    except FetchError as error:
        pytest.skip(f"{source.filename} is not cached and {error}; `python tests/upstream_sources.py` fetches it")


def published_or_skip(source: Source, path: str, names: tuple[str, ...]) -> dict[str, Callable]:
    """:func:`published_functions` inside a test, skipping with the reason when einops or the source is missing."""
    return published_functions(fetch_or_skip(source, needs=("einops",)), path, names)


if __name__ == "__main__":
    for item in SOURCES:
        try:
            print(f"{item.filename}: {fetch(item)}")
        except FetchError as error:
            sys.exit(f"upstream_sources: {error}")
