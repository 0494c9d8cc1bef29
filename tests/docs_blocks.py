"""The code blocks and links of README.md and docs/*.md, and the real parsers that check them (tests/test_docs.py).

Every ```bash / ```python block carries a marker on the line before it: ``<!-- docs-test: run -->`` (executed by
the default suite), ``slow`` (executed with ``-m slow``) or ``check`` (parsed, never run: it needs a hub, a GPU or
data we do not have). Every block is checked whatever its marker: each command by the parser of the program it
calls, each Python block compiled and its ``lily_ssm`` imports resolved.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- docs-test: (run|slow|check) -->$")
CHECKED_LANGUAGES = ("bash", "python")
# commands that need no checker of their own (they read or write files the docs name)
PLAIN_COMMANDS = {"ls", "cat", "head", "mkdir", "export", "cd", "git"}


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    marker: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path`` (any language), with the docs-test marker on the line before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        fence = lines[index].strip()
        if not fence.startswith("```"):
            index += 1
            continue
        start, language = index, fence[3:].strip()
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            index += 1
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        found.append(Block(path, start + 1, language, marker.group(1) if marker else None,
                           "\n".join(lines[start + 1:index])))
        index += 1
    return found


def commands(text: str) -> list[list[str]]:
    """The simple commands of a bash block: continuation lines joined, comments dropped, split at ``&&``, ``||``,
    ``;`` and ``|``, leading ``NAME=value`` assignments removed."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in (";", "&&", "||", "|", "&"):
                while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                    current.pop(0)
                if current:
                    found.append(current)
                current = []
            else:
                current.append(token)
    return found


def is_setup_command(argv: list[str]) -> bool:
    """``pip install`` and ``pytest`` lines: checked, but not run by the docs test (it runs inside pytest, in an
    installed environment)."""
    return (argv[:1] == ["pip"] or argv[:3] in (["python", "-m", "pip"], ["python", "-m", "pytest"])
            or argv[:1] == ["pytest"])


def runnable_script(text: str) -> str:
    """A bash block with its setup commands (pip, pytest) taken out, line by line, ``&&`` chains kept."""
    kept = []
    for line in text.replace("\\\n", " ").splitlines():
        parts = [p for p in re.split(r"\s*&&\s*", line) if not (commands(p) and is_setup_command(commands(p)[0]))]
        if parts:
            kept.append(" && ".join(parts))
    return "\n".join(kept)


# --- the checkers: each raises AssertionError naming what is wrong ------------------------------------------------

def check_command(argv: list[str]) -> None:
    """Check one command of a bash block with the parser of the program it runs."""
    program = argv[0]
    if program == "lily-ssm":
        return check_lily_ssm(argv[1:])
    if program in ("torchrun", "accelerate"):
        assert "-m" in argv and argv[argv.index("-m") + 1] == "lily_ssm.cli", f"{argv}: expected -m lily_ssm.cli"
        return check_lily_ssm(argv[argv.index("-m") + 2:])
    if program == "bash":
        assert (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
        return None
    if program in ("python", "python3"):
        return check_python(argv[1:])
    if program == "pip":
        return check_pip(argv[1:])
    if program == "pytest":
        return check_pytest(argv[1:])
    if program == "ruff":
        assert argv[1:2] == ["check"], f"{argv}: only ruff check is documented"
        return None
    assert program in PLAIN_COMMANDS, f"no checker for the command {program!r} ({shlex.join(argv)})"


def check_python(args: list[str]) -> None:
    if args[:2] == ["-m", "pip"]:
        return check_pip(args[2:])
    if args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    if args[:2] == ["-m", "lily_ssm.cli"]:
        return check_lily_ssm(args[2:])
    if args[:1] == ["-c"]:
        compile(args[1], "<python -c>", "exec")
        return None
    script = args[0]
    assert (REPO / script).is_file(), f"python {script}: no such script"
    accepted = script_options(script)
    for arg in args[1:]:
        if arg.startswith("--"):
            assert arg.split("=")[0] in accepted, f"python {script}: {arg} is not an option of its --help"
    return None


_HELP: dict[str, tuple[int, str, str]] = {}


def script_options(script: str) -> frozenset[str]:
    """The ``--options`` a script's ``--help`` lists. On the first call every script the pages name is asked at
    once, in parallel processes (each imports torch: asked one by one they took most of the test's time)."""
    if script not in _HELP:
        named = {argv[1] for page in doc_files() for block in blocks(page) if block.language == "bash"
                 for argv in commands(block.text) if argv[0] in ("python", "python3") and len(argv) > 1
                 and argv[1].endswith(".py") and (REPO / argv[1]).is_file()}
        running = {name: subprocess.Popen([sys.executable, str(REPO / name), "--help"], cwd=REPO, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=run_env(None))
                   for name in sorted(named | {script}) if name not in _HELP}
        for name, process in running.items():
            out, err = process.communicate(timeout=120)
            _HELP[name] = (process.returncode, out, err)
    code, out, err = _HELP[script]
    assert code == 0, f"python {script} --help failed: {err[-500:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", out))


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def declared_packages() -> set[str]:
    project = pyproject()["project"]
    lines = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    return {re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0].lower() for line in lines}


def check_pip(args: list[str]) -> None:
    assert args[:1] == ["install"], f"pip {args}: only pip install is documented"
    extras = pyproject()["project"]["optional-dependencies"]
    for arg in args[1:]:
        if arg.startswith("-"):
            assert arg in ("-e", "-U", "--upgrade"), f"pip install {arg}: undocumented option"
            continue
        match = re.match(r"^(\.|lily-ssm)(?:\[([\w,-]+)\])?$", arg)
        if match:
            for extra in (match.group(2) or "").split(","):
                assert not extra or extra in extras, f"pip install {arg}: no extra {extra!r} ({', '.join(extras)})"
            continue
        name = re.split(r"[<>=!~]", arg, maxsplit=1)[0].lower()
        assert name in declared_packages(), f"pip install {arg}: {name} is not a declared dependency"


def check_pytest(args: list[str]) -> None:
    markers = {m.split(":")[0] for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "-m":
            index += 1
            words = set(re.findall(r"\w+", args[index])) - {"and", "or", "not"}
            assert words <= markers, f"pytest -m {args[index]}: unknown markers {words - markers}"
        elif arg == "-k":
            index += 1
        elif not arg.startswith("-"):
            assert (REPO / arg.split("::")[0]).exists(), f"pytest {arg}: no such test path"
        index += 1


def check_lily_ssm(args: list[str]) -> None:
    """Parse with lily-ssm's own parser; configs named must exist and load with their ``--set`` overrides."""
    from lily_ssm.cli import build_parser

    if args[:1] == ["lm-eval"] or args[:2] == ["--debug", "lm-eval"]:
        return check_lm_eval(args[args.index("lm-eval") + 1:])
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"lily-ssm {shlex.join(args)}: the parser refused it (exit {exc.code})") from exc
    config = getattr(parsed, "config", None)
    if config is not None:
        assert (REPO / config).is_file(), f"lily-ssm {parsed.command}: config {config} does not exist"
        load_config_for(parsed.command, str(REPO / config), parsed.set)
    if parsed.command == "eval-commonsense":
        from lily_ssm.data.prompts import resolve_tasks

        resolve_tasks(parsed.tasks)
    return None


def load_config_for(command: str, path: str, overrides: list[str]) -> None:
    from lily_ssm.ablation import load_ablation
    from lily_ssm.config.experiment import load_config
    from lily_ssm.config.vtab import load_vtab_config

    {"train": load_config, "vtab": load_vtab_config, "ablate": load_ablation}[command](path, overrides)


def check_lm_eval(args: list[str]) -> None:
    """lm-eval's own parser (its ``run`` command, as ``lily-ssm lm-eval`` hands the arguments over)."""
    from lm_eval._cli.harness import HarnessCLI

    try:
        parsed = HarnessCLI()._parser.parse_args(["run", *args])
    except SystemExit as exc:
        raise AssertionError(f"lily-ssm lm-eval {shlex.join(args)}: lm-eval's parser refused it") from exc
    assert parsed.model == "lily", "the docs' lm-eval commands use the lily backend"
    include = getattr(parsed, "include_path", None)
    if include:
        assert (REPO / include).is_dir(), f"--include_path {include} does not exist"


def check_python_block(block: Block) -> None:
    """Compile it; every ``lily_ssm`` module it imports exists and has the names it imports."""
    import importlib

    tree = ast.parse(block.text, filename=block.where)
    compile(tree, block.where, "exec")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lily_ssm"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lily_ssm"):
                    importlib.import_module(alias.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lily_ssm"):
            import lily_ssm

            assert hasattr(lily_ssm, node.attr), f"{block.where}: lily_ssm has no {node.attr}"


# --- links --------------------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of ``path``: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen: dict[str, int] = {}
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"^#{1,6} ", line):
            continue
        text = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text.replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


def _name(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def check_link(path: Path, target: str) -> None:
    if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
        return
    file, _, anchor = target.partition("#")
    destination = (path.parent / file).resolve() if file else path
    assert destination.exists(), f"{_name(path)}: link {target} points to a missing file"
    if anchor:
        assert destination.suffix == ".md", f"{_name(path)}: anchor on a non-markdown file {target}"
        assert anchor in anchors(destination), f"{_name(path)}: no heading #{anchor} in {_name(destination)}"


# --- running ------------------------------------------------------------------------------------------------------

def run_env(cache_dir: Path | None, bin_dir: Path | None = None) -> dict[str, str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if cache_dir is not None:
        env["LILY_SSM_CACHE"] = str(cache_dir)
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def workspace(root: Path) -> tuple[Path, Path]:
    """A working folder with configs/ and eval/ linked in, and a bin folder whose ``lily-ssm`` and ``python`` run
    this checkout with the test's interpreter."""
    work, bin_dir = root / "work", root / "bin"
    work.mkdir(parents=True)
    bin_dir.mkdir()
    for name in ("configs", "eval"):
        (work / name).symlink_to(REPO / name)
    for name, body in (("lily-ssm", f'exec "{sys.executable}" -m lily_ssm.cli "$@"'),
                       ("python", f'exec "{sys.executable}" "$@"'), ("python3", f'exec "{sys.executable}" "$@"')):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return work, bin_dir


def run_block(block: Block, work: Path, bin_dir: Path, cache_dir: Path, timeout: int) -> None:
    """Execute ``block`` in ``work`` as a user would (bash with ``-e``, or a Python script); fail with its output."""
    if block.language == "python":
        return run_python_block(block, work)
    argv = ["bash", "-euo", "pipefail", "-c", runnable_script(block.text)]
    result = subprocess.run(argv, cwd=work, env=run_env(cache_dir, bin_dir), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{block.where} failed (exit {result.returncode}):\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")


def run_python_block(block: Block, work: Path) -> None:
    """Execute a Python block as a script in ``work``, in this process: its imports (torch, transformers) are
    loaded already, which saves most of its time. The test suite's environment is offline (tests/conftest.py)."""
    import contextlib
    import io
    import os

    before = Path.cwd()
    output = io.StringIO()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(block.text, block.where, "exec"), {"__name__": "__main__"})
    except Exception as exc:
        raise AssertionError(f"{block.where} failed: {type(exc).__name__}: {exc}\n{output.getvalue()[-2000:]}") from exc
    finally:
        os.chdir(before)
