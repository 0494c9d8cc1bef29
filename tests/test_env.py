"""lily-ssm env: what a bug report needs, and the installed packages outside the declared ranges."""

from __future__ import annotations

import platform

import torch
import transformers

from lily_ssm import env
from lily_ssm.cli import main as cli


def test_env_prints_versions_kernels_and_each_familys_path(capsys):
    assert cli(["env"]) == 0
    out = capsys.readouterr().out
    assert f"Python: {platform.python_version()}" in out
    assert f"torch: {torch.__version__}" in out and f"transformers: {transformers.__version__}" in out
    assert "GPU: " in out
    for kernel in ("mamba-ssm", "causal-conv1d"):  # neither imports on this CPU machine: it says why
        line = next(line for line in out.splitlines() if line.startswith(f"{kernel}: "))
        assert "does not import (" in line and "Error" in line, line
    for family in ("Mamba-1 (", "Mamba-2 ("):
        for device in ("on cpu", "on cuda"):
            assert any(line.startswith(family) and device in line for line in out.splitlines()), (family, device)
    assert "outside lily-ssm's declared ranges: nothing" in out


def test_a_package_outside_its_declared_range_is_named(monkeypatch, capsys):
    real = env.installed_version
    monkeypatch.setattr(env, "installed_version", lambda name: "5.14.0" if name == "transformers" else real(name))
    problems = env.out_of_range(env.declared_requirements())
    assert problems == ["transformers 5.14.0 (declared: <6,>=5.15)"] or problems == \
        ["transformers 5.14.0 (declared: >=5.15,<6)"], problems
    assert cli(["env"]) == 0
    assert "outside lily-ssm's declared ranges: transformers 5.14.0" in capsys.readouterr().out


def test_the_declared_ranges_are_read_from_pyproject_without_the_package_metadata(monkeypatch):
    def missing(name):
        raise env.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(env.metadata, "requires", missing)
    names = {requirement.name for requirement in env.declared_requirements()}
    assert {"torch", "transformers", "peft", "lm-eval", "mamba-ssm"} <= names
