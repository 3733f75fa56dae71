"""A chapter's MyST source as a Jupyter notebook to download: generated at build time, never stored.

``chapter_notebook(page, edition)`` reads ``page`` with jupytext and returns a notebook that
runs anywhere Jupyter does (Colab, a JupyterHub, a laptop):

* a first cell that installs the package (and myst-nb, whose ``glue`` the chapters call) where
  it is missing, and fetches the data files the chapter reads;
* MyST's directives and roles turned into plain Markdown, which every notebook front end shows
  (exercises and solutions as headings, admonitions as quotes, ``literalinclude`` as the code it
  includes, citations as author and year); a glued table, equation or figure is shown by the
  cell that computes it;
* no outputs.

The ``student`` edition also drops every solution, and puts an empty cell under each exercise
and, under each exercise that ``mobiletl_edu.exercises`` can check, a ``check`` call.
"""
from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import jupytext
import nbformat

EDITIONS = ("book", "student")

# ```{name} argument / :::{name} argument, options, body, closing fence of the same length
_DIRECTIVE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{(?P<name>[\w:-]+)\}[ \t]*(?P<arg>[^\n]*)\n(?P<body>.*?)^(?P=fence)[ \t]*$",
                        re.M | re.S)
_GATED = ("exercise-start", "exercise-end", "solution-start", "solution-end")
_ROLE = re.compile(r"\{(?P<name>[\w:-]+)\}`(?P<text>[^`]*)`")
_TARGET = re.compile(r"^\([\w-]+\)=[ \t]*\n", re.M)
_LABELLED_MATH = re.compile(r"^\$\$(?P<math>.*?)^\$\$[ \t]*\((?P<label>[\w-]+)\)[ \t]*$", re.M | re.S)
_GLUE_DIRECTIVES = ("glue:md", "glue:math", "glue:figure", "glue:", "glue")


def split_options(body: str) -> tuple[dict, str]:
    """A directive body's leading ``:key: value`` lines, and the rest."""
    options, lines = {}, body.splitlines()
    while lines and re.match(r"^:[\w-]+:", lines[0]):
        key, _, value = lines.pop(0)[1:].partition(":")
        options[key] = value.strip()
    return options, "\n".join(lines).strip("\n")


class Context:
    """What the conversion of one page needs: titles of the other pages, the bibliography, the repo."""

    def __init__(self, page: Path, repo_root: Path, titles: dict, citations: dict):
        self.page, self.repo_root, self.titles, self.citations = page, repo_root, titles, citations

    def cite(self, keys: str, parenthetical: bool) -> str:
        found = [self.citations.get(k.strip(), (k.strip(), "")) for k in keys.split(",")]
        if parenthetical:
            return "(" + "; ".join(f"{a}, {y}" for a, y in found) + ")"
        return "; ".join(f"{a} ({y})" for a, y in found)

    def doc_link(self, text: str) -> str:
        label, target = _explicit(text)
        path = (self.page.parent / target).resolve()
        name = label or self.titles.get(path.stem, path.stem)
        return f"[{name}]({path.stem}.ipynb)"

    def include(self, path_text: str, options: dict) -> str:
        path = (self.page.parent / path_text.strip()).resolve()
        source = path.read_text()
        rel = path.relative_to(self.repo_root) if path.is_relative_to(self.repo_root) else path.name
        if "pyobject" in options:
            node = ast.parse(source)
            for name in options["pyobject"].split("."):  # Class.method, as Sphinx's pyobject
                node = next((n for n in getattr(node, "body", []) if getattr(n, "name", None) == name), None)
            if node is None:  # Sphinx reports it; the notebook points at the file
                return f"See `{options['pyobject']}` in `{rel}`."
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            source = "\n".join(source.splitlines()[start - 1:node.end_lineno])
        return f"From `{rel}`:\n\n```python\n{source.rstrip()}\n```"


def _explicit(text: str) -> tuple[str | None, str]:
    """``text <target>`` -> (text, target); ``target`` -> (None, target)."""
    found = re.match(r"^(.*?)\s*<([^>]+)>$", text.strip(), re.S)
    return (found.group(1), found.group(2)) if found else (None, text.strip())


def convert_roles(text: str, ctx: Context) -> str:
    def role(match):
        name, content = match.group("name"), match.group("text")
        label, target = _explicit(content)
        if name in ("cite:p", "cite", "cite:ps"):
            return ctx.cite(content, parenthetical=True)
        if name in ("cite:t", "cite:ts"):
            return ctx.cite(content, parenthetical=False)
        if name == "doc":
            return ctx.doc_link(content)
        if name == "eq":
            return f"({content})"
        if name.startswith("glue"):
            return f"`{content.split(':')[0]}`"
        if name in ("numref", "ref", "prf:ref", "term"):
            return label or target
        return match.group(0)  # a role we do not know stays as written

    return _ROLE.sub(role, text)


def convert_directive(name: str, arg: str, body: str, ctx: Context) -> str:
    """One non-gated directive as plain Markdown."""
    options, content = split_options(body)
    if name == "literalinclude":
        return ctx.include(arg, options)
    if name.startswith("glue"):
        caption = f" {convert_markdown_text(content, ctx)}" if content and name == "glue:figure" else ""
        return f"*(`{arg.strip()}` is shown under the code cell above that computes it.{caption})*"
    if name == "bibliography":
        return ""
    inner = convert_markdown_text(content, ctx)
    if name.startswith("prf:"):
        kind = name[4:].capitalize()
        title = f"{kind} ({arg.strip()})" if arg.strip() else kind
        return f"**{title}.** {inner}"
    title = arg.strip() or name.capitalize()
    quoted = "\n".join(f"> {line}" if line else ">" for line in inner.splitlines())
    return f"> **{title}**\n>\n{quoted}"


def convert_markdown_text(text: str, ctx: Context) -> str:
    """Markdown with MyST directives (other than the gated ones) and roles made plain."""
    text = _TARGET.sub("", text)
    text = _LABELLED_MATH.sub(lambda m: f"$${m.group('math').rstrip()}\n\\tag{{{m.group('label')}}}\n$$", text)

    def directive(match):
        return convert_directive(match.group("name"), match.group("arg"), match.group("body"), ctx)

    text = _DIRECTIVE.sub(directive, text)
    return convert_roles(text, ctx)


def markdown_pieces(text: str, ctx: Context) -> list:
    """A markdown cell as plain-Markdown strings and ``(marker, argument, options)`` tuples for the
    gated exercise and solution directives, in order."""
    pieces, at = [], 0
    for match in _DIRECTIVE.finditer(text):
        if match.group("name") not in _GATED:
            continue
        pieces.append(convert_markdown_text(text[at:match.start()], ctx))
        options, _ = split_options(match.group("body"))
        pieces.append((match.group("name"), match.group("arg").strip(), options))
        at = match.end()
    pieces.append(convert_markdown_text(text[at:], ctx))
    return pieces


def install_cell(source: str, data_files: list[str], raw_url: str | None) -> str:
    lines = ["# Set-up: install the package where it is missing (Colab, a fresh Jupyter).",
             "import importlib.util, pathlib, subprocess, sys, urllib.request",
             "",
             f"PACKAGE = {source!r}",
             "missing = [p for p, m in ((PACKAGE, 'mobiletl_edu'), ('myst-nb', 'myst_nb')) if importlib.util.find_spec(m) is None]",
             "if missing:",
             "    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *missing], check=True)"]
    if data_files:
        lines += ["", "# the data files this chapter reads, from the repository",
                  f"for name in {data_files!r}:",
                  "    path = pathlib.Path(name)",
                  "    if not path.is_file():"]
        if raw_url:
            lines += ["        path.parent.mkdir(parents=True, exist_ok=True)",
                      f"        urllib.request.urlretrieve({raw_url!r} + name, path)"]
        else:
            lines += ["        print(f'{name} is missing: copy it from the book/ folder of the repository')"]
    return "\n".join(lines)


def check_cell(label: str, expects: str, symbols: tuple = ()) -> str:
    """The cell under a checkable exercise: what to hand in, and the ``check`` call."""
    lines = textwrap.wrap(f"Check your answer: {expects}", 86, initial_indent="# ", subsequent_indent="# ")
    if symbols:
        lines += ["from mobiletl_edu.exercises import check, symbols", "",
                  f"S = symbols({label!r})  # " + ", ".join(f"S.{name}" for name in symbols)]
    else:
        lines += ["from mobiletl_edu.exercises import check", ""]
    return "\n".join(lines + ["answer = ...", f"check({label!r}, answer)"])


def _glue_keys_shown(notebook, keys: set[str]) -> None:
    """Make each ``glue(...)`` call whose key a glue directive shows display its value where it runs."""
    call = re.compile(r"glue\(\s*(?P<f>f?)(?P<q>[\"'])(?P<key>.*?)(?P=q)(?P<rest>.*?)display\s*=\s*False", re.S)

    def show(match):
        key = match.group("key")
        pattern = re.escape(key) if not match.group("f") else ".+?".join(
            re.escape(part) for part in re.split(r"\{[^}]*\}", key))
        if any(re.fullmatch(pattern, k) for k in keys):
            return match.group(0)[: -len("False")] + "True"
        return match.group(0)

    for cell in notebook.cells:
        if cell.cell_type == "code" and "glue(" in cell.source:
            cell.source = call.sub(show, cell.source)


def chapter_notebook(page: Path, edition: str = "book", *, repo_root: Path, titles: dict | None = None,
                     citations: dict | None = None, checkable: dict | None = None, package: str = "mobiletl-edu",
                     raw_url: str | None = None):
    """The notebook of one MyST page (see the module docstring); ``checkable``: label -> (what
    ``check`` expects, the names of its sympy symbols)."""
    if edition not in EDITIONS:
        raise ValueError(f"unknown edition {edition!r}; valid choices: {', '.join(EDITIONS)}")
    page = Path(page).resolve()
    ctx = Context(page, Path(repo_root).resolve(), titles or {}, citations or {})
    source = jupytext.read(page)
    text = page.read_text()
    glued = set(re.findall(r"\{glue(?::md|:math|:figure)?\}[ \t]*(\S+)", text))
    data_files = sorted(str(p.relative_to(page.parent)) for p in page.parent.rglob("*")
                        if p.is_file() and p.suffix not in (".md", ".bib", ".py", ".pyc")
                        and p.name in "\n".join(c.source for c in source.cells if c.cell_type == "code"))

    items = []  # markdown strings, gated markers, code cells
    for cell in source.cells:
        if cell.cell_type == "markdown":
            items += markdown_pieces(cell.source, ctx)
        elif cell.cell_type == "code":
            tags = cell.metadata.get("tags", [])
            metadata = {"tags": tags}
            if {"remove-cell", "remove-input", "hide-input"} & set(tags):
                metadata["jupyter"] = {"source_hidden": True}  # bookkeeping: folded in JupyterLab
            items.append(nbformat.v4.new_code_cell(cell.source, metadata=metadata))

    cells, markdown, skipping, exercise = [], [], False, None

    def flush():
        joined = "\n\n".join(m.strip("\n") for m in markdown if m.strip())
        if joined:
            cells.append(nbformat.v4.new_markdown_cell(joined))
        markdown.clear()

    for item in items:
        if isinstance(item, tuple):
            marker, arg, options = item
            if marker == "solution-end":
                skipping = False
            elif skipping:
                continue
            elif marker == "exercise-start":
                exercise = options.get("label")
                markdown.append(f"#### Exercise: {arg}" if arg else "#### Exercise")
            elif marker == "exercise-end":
                if edition == "student":
                    flush()
                    cells.append(nbformat.v4.new_code_cell("# Your work here"))
                    if exercise in (checkable or {}):
                        cells.append(nbformat.v4.new_code_cell(check_cell(exercise, *checkable[exercise])))
                exercise = None
            elif marker == "solution-start":
                if edition == "student":
                    skipping = True
                else:
                    markdown.append("#### Solution")
        elif skipping:
            continue
        elif isinstance(item, str):
            markdown.append(item)
        else:
            flush()
            cells.append(item)
    flush()
    install = install_cell(package, data_files, raw_url)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(install), *cells],
                                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"},
                                                  "language_info": {"name": "python"}})
    _glue_keys_shown(notebook, glued)
    return notebook


def page_title(page: Path) -> str:
    found = re.search(r"^# (.+)$", Path(page).read_text(), re.M)
    return found.group(1).strip() if found else Path(page).stem


def bib_citations(bib: Path) -> dict:
    """key -> (authors as cited, year), from a .bib file: 'Chiang et al.', 'Sandler and Howard'."""
    from pybtex.database import parse_file

    out = {}
    for key, entry in parse_file(str(bib)).entries.items():
        people = entry.persons.get("author", [])
        last = [" ".join(p.last_names) for p in people]
        authors = last[0] if len(last) == 1 else f"{last[0]} and {last[1]}" if len(last) == 2 else f"{last[0]} et al."
        out[key] = (authors or key, entry.fields.get("year", ""))
    return out
