"""README.md and docs/: every command runs as written, every link resolves, generated references are current.

Each ```bash / ```python block is marked (tests/docs_blocks.py): ``run`` blocks execute in the default suite,
``slow`` ones with ``-m slow``, ``check`` ones are only checked. Every block of every kind is checked with the real
parsers: lily-ssm's argparse parser and config loaders, lm-eval's parser, the eval scripts' ``--help``, pyproject's
extras and markers, Python's compiler.
"""

from __future__ import annotations

import re

import pytest
from docs_blocks import (
    CHECKED_LANGUAGES,
    REPO,
    blocks,
    check_command,
    check_link,
    check_python_block,
    commands,
    doc_files,
    links,
    pyproject,
    run_block,
    workspace,
)
from docs_reference import generators, regions, render
from packaging.specifiers import SpecifierSet

PAGES = doc_files()
ALL_BLOCKS = [b for page in PAGES for b in blocks(page) if b.language in CHECKED_LANGUAGES]


def _page_id(page) -> str:
    return str(page.relative_to(REPO))


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    expected = {"README.md", "commands.md", "configuration.md", "families.md", "adapters.md", "routing.md",
                "protocols.md", "gpu.md", "benchmarks.md", "interop.md", "install.md", "development.md", "design.md"}
    assert expected <= names, f"missing pages: {sorted(expected - names)}"


def test_the_readme_is_short_and_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    first = blocks(REPO / "README.md")[0]
    assert first.text.splitlines() == ['python -m pip install torch==2.13.0 -e . && lily-ssm quickstart',
                                       'python -m pip install torch==2.13.0 -e ".[dev]" && python -m pytest']


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_code_block_is_marked(page):
    unmarked = [b.where for b in blocks(page) if b.language in CHECKED_LANGUAGES and b.marker is None]
    assert not unmarked, ("blocks without <!-- docs-test: run|slow|check --> on the line before: "
                          + ", ".join(unmarked))
    aliases = [f"{b.where} ({b.language})" for b in blocks(page)
               if b.language in ("sh", "shell", "console", "zsh", "py", "python3", "pycon")]
    assert not aliases, f"write commands as ```bash and code as ```python, so they are checked: {', '.join(aliases)}"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "bash"], ids=lambda b: b.where)
def test_every_shell_command_is_accepted_by_its_parser(block):
    found = commands(block.text)
    assert found, f"{block.where}: an empty bash block"
    for argv in found:
        try:
            check_command(argv)
        except AssertionError as exc:
            raise AssertionError(f"{block.where}: {exc}") from None


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "python"], ids=lambda b: b.where)
def test_every_python_block_compiles_and_imports_what_exists(block):
    check_python_block(block)


@pytest.mark.parametrize("line", [
    "lily-ssm train configs/tiny/lily_in.yaml --no-such-option",
    "lily-ssm train configs/tiny/no-such-config.yaml",
    "lily-ssm train configs/tiny/lily_in.yaml --set training.no_such_key=1",
    "lily-ssm eval-commonsense --model m --data-root d --tasks boolq,no_such_task",
    "lily-ssm lm-eval --model lily --no-such-flag",
    "torchrun --nproc_per_node 2 -m lily_ssm.cli train configs/tiny/lily_in.yaml --no-such-option",
    "python eval/bench/scan.py --no-such-option 3",
    "pip install -e '.[no-such-extra]'",
    "python -m pytest -m no_such_marker",
    "an-unknown-program --flag",
])
def test_the_checkers_refuse_what_would_not_run(line):
    with pytest.raises((AssertionError, ValueError)):
        for argv in commands(line):
            check_command(argv)


def test_links_to_missing_pages_or_headings_are_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n[ok](#a-heading) [gone](missing.md) [no anchor](#no-such-heading)\n")
    check_link(page, "#a-heading")
    for target in ("missing.md", "#no-such-heading"):
        with pytest.raises(AssertionError):
            check_link(page, target)


def test_the_readme_states_the_declared_version_ranges():
    """The README's table of supported versions is pyproject.toml's, package by package."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    declared = {Requirement(line).name.replace("_", "-").lower(): Requirement(line).specifier
                for line in [*project["dependencies"], *(d for extra in project["optional-dependencies"].values()
                                                         for d in extra)]}
    text = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([\w-]+) \| (>=[^|]+) \|", text, flags=re.M)
    assert len(rows) >= 10
    for name, supported in rows:
        key = name.replace("_", "-").lower()
        assert key in declared, f"README lists {name}, which pyproject.toml does not declare"
        assert SpecifierSet(supported.replace(" ", "")) == declared[key], \
            f"README: {name} {supported}; pyproject.toml: {declared[key]}"
    documented = {name.replace("_", "-").lower() for name, _ in rows}
    ranged = {name for name, spec in declared.items() if any(s.operator == "<" for s in spec)}
    assert ranged <= documented, f"declared ranges the README does not state: {sorted(ranged - documented)}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_relative_link_and_anchor_resolves(page):
    for target in links(page):
        check_link(page, target)


def test_the_generated_references_are_current():
    """Option tables, config keys and target-set presets are what the code says (python tests/docs_reference.py
    rewrites them)."""
    found: dict[str, str] = {}
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert render(text) == text, f"{_page_id(page)} is stale: run python tests/docs_reference.py"
        for name in regions(text):
            assert name not in found, f"generated region {name!r} appears twice"
            found[name] = _page_id(page)
    missing = sorted(set(generators()) - set(found))
    assert not missing, ("no page holds these generated references; add <!-- generated: NAME --> ... "
                         f"<!-- /generated --> for: {', '.join(missing)}")


def _blocks_to_run(page, kinds):
    return [b for b in blocks(page) if b.language in CHECKED_LANGUAGES and b.marker in kinds]


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks_to_run(p, ("run",))], ids=_page_id)
def test_run_blocks_execute(page, tmp_path):
    work, bin_dir = workspace(tmp_path)
    for block in _blocks_to_run(page, ("run",)):
        run_block(block, work, bin_dir, tmp_path / "cache", timeout=120)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One lily-ssm cache for the slow walk-throughs: the built-in tiny model is built once."""
    return tmp_path_factory.mktemp("lily-ssm-cache")


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if _blocks_to_run(p, ("slow",))], ids=_page_id)
def test_slow_blocks_execute_in_order(page, tmp_path, shared_cache):
    """A page's run and slow blocks, in order, in one workspace: a walk-through as a user follows it."""
    work, bin_dir = workspace(tmp_path)
    for block in _blocks_to_run(page, ("run", "slow")):
        run_block(block, work, bin_dir, shared_cache, timeout=3600)  # a loaded 2-core machine is slow
