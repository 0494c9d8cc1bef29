"""The parts of docs/ generated from the code, so they cannot drift: every command's options (from
``lily_ssm.cli.build_parser``), the config keys (from the section classes the loaders validate with) and the
ablation target-set presets (``lily_ssm.ablation.config.TARGET_SETS``).

Each lives between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``; tests/test_docs.py checks that the text
there is what this module generates. After changing a parser or a section, rewrite them with

    python tests/docs_reference.py
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REGION = re.compile(r"(<!-- generated: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options_table(command: str) -> str:
    """The options of ``lily-ssm COMMAND`` as a markdown table, read from the parser itself."""
    from lily_ssm.cli import build_parser

    parser = _subparsers(build_parser())[command]
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in ("debug", "lm_eval_args"):
            continue
        if action.option_strings:
            name = ", ".join(action.option_strings)
            if action.nargs != 0:
                name += f" {action.metavar or action.dest.upper()}"
        else:
            name = action.metavar or action.dest.upper()
            name += " ..." if action.nargs == "+" else ""
        if action.required and action.option_strings:
            default = "(required)"
        elif action.nargs == 0 or action.default in (None, argparse.SUPPRESS, []):
            default = ""
        else:
            default = f"`{action.default}`"
        meaning = action.help or ""
        if action.choices:
            meaning = f"one of {', '.join(map(str, action.choices))}; {meaning}".rstrip("; ")
        group = next((g for g in parser._mutually_exclusive_groups if action in g._group_actions), None)
        if group is not None:
            others = [a.option_strings[0] for a in group._group_actions if a is not action]
            meaning += f" ({'required: ' if group.required else ''}this or {', '.join(others)})"
        rows.append(f"| `{name}` | {default} | {_cell(meaning)} |")
    return "\n".join(rows)


def config_table(kind: str, section: str) -> str:
    """The keys of config ``section`` of ``kind`` (train, vtab, ablate): key, default, meaning."""
    from lily_ssm.ablation import config as ablation
    from lily_ssm.config import experiment, vtab
    from lily_ssm.utils.sections import section_reference

    classes = {"train": experiment.SECTIONS, "vtab": vtab.SECTIONS,
               "ablate": {"ablation": ablation.AblationSection, "evaluation": ablation.EvaluationSection}}[kind]
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in section_reference(classes[section]):
        rows.append(f"| `{section}.{key}` | `{_cell(default)}` | {_cell(meaning)} |")
    return "\n".join(rows)


def target_sets_table() -> str:
    """Every ablation preset and the targets it adapts, per preset table."""
    from lily_ssm.ablation.config import DEFAULT_ROUTING, DEFAULT_SETS, TARGET_SETS

    rows = ["| base | preset | targets | run by default |", "|---|---|---|---|"]
    for table, presets in TARGET_SETS.items():
        for name, targets in presets.items():
            default = "yes" if name in DEFAULT_SETS[table] else ""
            rows.append(f"| {table} | `{name}` | {', '.join(f'`{t}`' for t in targets)} | {default} |")
    routing = ", ".join(f"{table}: `{mode}`" for table, mode in DEFAULT_ROUTING.items())
    return "\n".join(rows) + f"\n\nDefault Lily routing per base: {routing}."


def generators() -> dict[str, Callable[[], str]]:
    """Every generated region by name."""
    from lily_ssm.cli import build_parser

    found: dict[str, Callable[[], str]] = {}
    for command in _subparsers(build_parser()):
        if command == "lm-eval":  # its arguments are lm-eval's own
            continue
        found[f"options {command}"] = lambda c=command: options_table(c)
    for kind, sections in (("train", ("model", "data", "training")), ("vtab", ("model", "data", "training")),
                           ("ablate", ("ablation", "evaluation"))):
        for section in sections:
            found[f"config {kind} {section}"] = lambda k=kind, s=section: config_table(k, s)
    found["target sets"] = target_sets_table
    return found


def regions(text: str) -> dict[str, str]:
    """The generated regions of a page: name -> its current text."""
    return {m.group("name"): m.group("body") for m in REGION.finditer(text)}


def render(text: str) -> str:
    """``text`` with every generated region rewritten."""
    table = generators()

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in table:
            raise KeyError(f"unknown generated region {name!r}; known: {', '.join(table)}")
        return f"{match.group(1)}{table[name]()}\n{match.group(4)}"

    return REGION.sub(fill, text)


def main() -> int:
    argparse.ArgumentParser(description="Rewrite the generated references in docs/*.md from the code.").parse_args()
    sys.path.insert(0, str(REPO))
    from lily_ssm.utils.atomic import write_atomic

    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            write_atomic(page, new)
            print(f"rewrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
