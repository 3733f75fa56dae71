"""The documentation promises what the project does: commands, docstrings, --help, links.

Fast checks, no book build: the README's first block gives the two commands a new user
needs, CI runs the same test command, every exported name is documented, every subcommand
of the CLI answers ``--help``, and every ``{doc}`` link in the book points to a page that
``_toc.yml`` builds (with ``only_build_toc_files`` any other target is a broken link).
"""
from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toc import toc_files

import mobiletl_edu
from mobiletl_edu.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"


def _fenced_blocks(text: str) -> list[str]:
    """The bodies of the Markdown code blocks fenced with three or more backticks."""
    return [m.group(2) for m in re.finditer(r"^(`{3,})[^\n]*\n(.*?)^\1\s*$", text, re.M | re.S)]


def _commands(block: str) -> list[str]:
    """The shell commands of a block: each line without its comment, blank lines dropped."""
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_first_block_gives_make_book_and_make_test():
    blocks = _fenced_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md has no fenced code block"
    commands = _commands(blocks[0])
    assert "make book" in commands, f"README's first block should run `make book`, has {commands}"
    assert "make test" in commands, f"README's first block should run `make test`, has {commands}"


def test_ci_runs_make_test():
    commands = _commands((REPO / ".ci" / "run").read_text())
    assert any(re.fullmatch(r"(exec\s+)?make\s+test(\s.*)?", c) for c in commands), (
        f".ci/run should run `make test`; its commands are {commands}")


def _own_docstring(obj) -> str | None:
    """A docstring written for ``obj`` itself, not one inherited from its class or a base class."""
    if inspect.isclass(obj):
        return obj.__dict__.get("__doc__")
    return obj.__doc__ if inspect.isroutine(obj) else None


# Functions and classes carry docstrings. A constant (a tuple such as METHODS) only carries its
# type's docstring; constants are documented on the "Using the package" page (next test).
DOCUMENTABLE = [n for n in mobiletl_edu.__all__
                if inspect.isclass(getattr(mobiletl_edu, n)) or inspect.isroutine(getattr(mobiletl_edu, n))]


@pytest.mark.parametrize("name", DOCUMENTABLE)
def test_public_function_or_class_has_a_docstring(name):
    doc = _own_docstring(getattr(mobiletl_edu, name))
    assert doc and doc.strip(), f"mobiletl_edu.{name} has no docstring"


def test_every_public_name_appears_in_the_using_page():
    page = (BOOK / "using.md").read_text()
    missing = [name for name in mobiletl_edu.__all__ if not re.search(rf"\b{re.escape(name)}\b", page)]
    assert not missing, f"book/using.md does not mention the exported names {missing}"


def _subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1, "the CLI should have one set of subcommands"
    return list(actions[0].choices)


def test_the_cli_has_subcommands():
    assert _subcommands(), "build_parser() declares no subcommand"


@pytest.mark.parametrize("subcommand", _subcommands())
def test_subcommand_help_exits_0(subcommand, capsys):
    assert main([subcommand, "--help"]) == 0  # main returns argparse's status instead of exiting
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mobiletl-edu {subcommand}"), out[:200]


def test_top_level_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", "--help"], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    missing = [s for s in _subcommands() if s not in result.stdout]
    assert not missing, f"`mobiletl-edu --help` does not list {missing}"


def _toc_documents() -> set[str]:
    """Every page the book builds, as a path relative to the repository root, no extension."""
    return {str(Path(f).with_suffix("")) if Path(f).suffix in (".md", ".ipynb") else f for f in toc_files()}


DOC_ROLE = re.compile(r"\{doc\}`([^`]*)`")


def _doc_links() -> list[tuple[str, str]]:
    """(page, target) for every {doc} role in book/*.md, the target relative to the repository root."""
    links = []
    for page in sorted(BOOK.glob("*.md")):
        for text in DOC_ROLE.findall(page.read_text()):
            target = re.search(r"<([^>]*)>\s*$", text)
            target = (target.group(1) if target else text).strip()
            if target.startswith("/"):
                resolved = target.lstrip("/")
            else:
                resolved = (page.parent / target).resolve().relative_to(REPO).as_posix()
            links.append((page.name, str(Path(resolved).with_suffix("")) if resolved.endswith(".md") else resolved))
    return links


def test_book_has_doc_links():
    assert _doc_links(), "no {doc} role found in book/*.md: is the pattern still right?"


def test_every_doc_link_is_a_page_of_the_toc():
    pages = _toc_documents()
    broken = [f"{page}: {{doc}}`{target}`" for page, target in _doc_links() if target not in pages]
    assert not broken, "links to pages that _toc.yml does not build:\n" + "\n".join(broken)
