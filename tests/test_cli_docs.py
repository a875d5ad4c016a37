"""docs/cli.md against the command line itself: every option `--help` shows is documented under its
command's heading, no documented option is gone, and every variable the Makefile passes on is listed
with the targets that really pass it on. In-process: the parsers are built, not run."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.__main__ import build_parser

REPO = Path(__file__).resolve().parent.parent
CLI_DOC = REPO / "docs" / "cli.md"
BENCHMARKS = sorted((REPO / "benchmarks").glob("bench_*.py"))
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def sections(text: str) -> dict[str, str]:
    """Each `### `name`` heading's text (up to the next heading) under its backticked name."""
    found = {}
    for match in re.finditer(r"^#{2,3} `([^`]+)`\n(.*?)(?=^#{1,3} |\Z)", text, flags=re.M | re.S):
        found[match.group(1)] = match.group(2)
    return found


def documented_in(option: str, section: str) -> bool:
    """Documented: in the first cell of a row of the section's table (| `--option ...` |), not only
    named in its prose."""
    return re.search(rf"^\|[^|\n]*`{re.escape(option)}(?![\w-])", section, flags=re.M) is not None


def shown_by(parser: argparse.ArgumentParser) -> list[str]:
    """What `--help` lists: option strings, a positional's choices, or its name."""
    shown = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            shown += action.option_strings
        elif action.choices:
            shown += list(action.choices)
        else:
            shown.append(action.dest)
    return shown


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


class ParserBuilt(Exception):
    pass


def benchmark_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    """The parser a benchmark's main() builds, caught at parse_args (nothing of the bench runs)."""
    monkeypatch.syspath_prepend(str(path.parent))  # bench_train imports notebook_script beside it
    spec = importlib.util.spec_from_file_location(f"_cli_docs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def caught(self, *args, **kwargs):
        raise ParserBuilt(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(sys, "argv", [str(path)])
    with pytest.raises(ParserBuilt) as built:
        module.main()
    return built.value.args[0]


def check_documented(name: str, parser: argparse.ArgumentParser) -> None:
    doc = sections(CLI_DOC.read_text())
    assert name in doc, f"docs/cli.md has no section `{name}` (a heading ### `{name}`)"
    missing = [option for option in shown_by(parser) if not documented_in(option, doc[name])]
    assert not missing, f"`{name} --help` shows {missing}, which docs/cli.md does not document under `{name}`"
    known = {option for option in shown_by(parser) if option.startswith("--")}
    gone = sorted(set(OPTION.findall(doc[name])) - known - {"--help"})
    assert not gone, f"docs/cli.md documents {gone} under `{name}`, which `{name} --help` does not show"


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_of_every_command_is_in_the_cli_reference(command):
    check_documented(command, subcommands()[command])


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_every_option_of_every_benchmark_is_in_the_cli_reference(path, monkeypatch):
    check_documented(f"benchmarks/{path.name}", benchmark_parser(path, monkeypatch))


def makefile_variables() -> dict[str, set[str]]:
    """Every variable the Makefile takes from its user, with the targets whose rule line or recipe
    reads it (empty for one read outside a named target: STORAGE's export, PYTHON's venv)."""
    text = (REPO / "Makefile").read_text()
    assigned = set(re.findall(r"^(?:export\s+)?([A-Z_]+)\s*:?=", text, flags=re.M))  # :=, = (not ?=)
    used: dict[str, set[str]] = {}
    target = None
    for line in text.splitlines():
        rule = re.match(r"^([a-z][a-z-]*|\$\([A-Z_]+\)):", line)
        if rule:
            target = rule.group(1) if not rule.group(1).startswith("$") else None
        elif not line.startswith("\t"):
            target = None
        names = re.findall(r"\$\(([A-Z_]+)\)|\borigin ([A-Z_]+)|^ifdef ([A-Z_]+)", line.split("##")[0])
        for name in {n for group in names for n in group if n}:
            if name in assigned or name == "MAKEFILE_LIST":
                continue
            used.setdefault(name, set())
            if target:
                used[name].add(target)
    return used


def make_variable_rows() -> dict[str, set[str]]:
    """docs/cli.md's make-variable table: each variable with the targets its rows name."""
    table = CLI_DOC.read_text().split("## Make variables", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, set[str]] = {}
    variable = None
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= {"-"} and cells[0]:
            continue
        name = re.fullmatch(r"`([A-Z_]+)`", cells[0])
        if name:
            variable = name.group(1)
        elif cells[0] or variable is None:
            continue
        rows.setdefault(variable, set()).update(re.findall(r"`([a-z][a-z-]*)`", cells[1]))
    return rows


def test_every_make_variable_is_in_the_cli_reference_with_the_targets_that_pass_it_on():
    documented = make_variable_rows()
    for variable, targets in makefile_variables().items():
        assert variable in documented, f"the Makefile passes on {variable}, which docs/cli.md's make table lacks"
        if targets:
            assert documented[variable] == targets, (
                f"docs/cli.md says {variable} reaches {sorted(documented[variable])}; the Makefile passes it to "
                f"{sorted(targets)}")


def test_the_python_the_docs_ask_for_is_the_one_pyproject_requires():
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    version = re.fullmatch(r">=\s*(\d+\.\d+)", floor).group(1)
    for page in ("README.md", "docs/development.md", "docs/cli.md"):
        assert f"Python {version}" in (REPO / page).read_text() or f"Python ≥ {version}" in (REPO / page).read_text(), (
            f"{page} does not ask for Python {version} (pyproject.toml: requires-python {floor})")
