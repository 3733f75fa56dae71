"""The classroom kit in the book: chapter notebooks, the student edition and launch buttons.

* Every MyST chapter becomes a notebook (``book/_ext/notebooks.py``) with an install cell first, no
  outputs and plain Markdown; its student version has no line of any solution, and an empty cell
  and, where ``exercises.check`` knows the exercise, a ``check`` call under each exercise. Two of
  them run top to bottom in a fresh kernel, in an empty folder, outside the book build.
* The student edition is built as ``make student`` builds it, with a dummy repository and
  JupyterHub: no solution text, code or output on any page, every exercise statement there, and
  each launch button pointing at the page's student notebook. When this session's book build
  (tests/test_book.py) has left executed notebooks newer than every source, the build reuses
  their outputs (``MOBILETL_REUSE_EXECUTED``) and executes nothing; otherwise it executes.
* The book built without a repository (tests/test_book.py's build) has no launch buttons and
  offers each chapter's notebook for download.
"""
from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from mobiletl_edu import exercises
from toc import toc_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "book" / "_ext"))
import classroom  # noqa: E402
import notebooks  # noqa: E402

BUILD = REPO / "_build"
DUMMY_REPO, DUMMY_HUB = "https://github.com/example-org/mobiletl-edu", "https://hub.example.org"
TIMEOUT_S = int(os.environ.get("MOBILETL_BOOK_TIMEOUT", "3600"))


def notebook_pages() -> list[Path]:
    """The pages of the table of contents that are MyST notebooks."""
    pages = [REPO / f"{name}.md" for name in toc_files()]
    return [p for p in pages if p.is_file() and "kernelspec:" in p.read_text().split("\n---", 1)[0]]


PAGES = notebook_pages()
IDS = [p.stem for p in PAGES]
CITATIONS = notebooks.bib_citations(REPO / "book" / "references.bib")
CHECKABLE = {label: (e.expects, e.symbols) for label, e in exercises.EXERCISES.items()}


def make(page: Path, edition: str):
    return notebooks.chapter_notebook(page, edition, repo_root=REPO, citations=CITATIONS, checkable=CHECKABLE)


def gated_blocks(page: Path, kind: str) -> list[tuple[str, str]]:
    """(label, source text) of each gated exercise or solution of a page."""
    text = page.read_text()
    pattern = (r"```\{" + kind + r"-start\}[^\n]*\n(?P<options>(?::[^\n]*\n)*)```\n(?P<body>.*?)```\{" + kind
               + r"-end\}")
    blocks = []
    for match in re.finditer(pattern, text, re.S):
        options = match.group("options")
        label = re.search(r":label: (\S+)", options) if kind == "exercise" else None
        target = re.search(r"```\{solution-start\} (\S+)", match.group(0))
        blocks.append(((label or target).group(1), match.group("body")))
    return blocks


def solution_lines(page: Path) -> tuple[list[str], list[str]]:
    """Distinctive lines of the page's solutions (found nowhere else on the page): code lines, and
    prose lines without markup."""
    text = page.read_text()
    for _, body in gated_blocks(page, "solution"):
        text = text.replace(body, "")
    included = [(page.parent / path).read_text() for path in re.findall(r"```\{literalinclude\} (\S+)", text)]
    elsewhere = {line.strip() for chunk in [text, *included] for line in chunk.splitlines()}
    code, prose = [], []
    for _, body in gated_blocks(page, "solution"):
        cells = re.findall(r"```\{code-cell\}[^\n]*\n(?:(?::[^\n]*\n)+\n?)?(.*?)```", body, re.S)
        code += [line.strip() for cell in cells for line in cell.splitlines() if len(line.strip()) > 25]
        text = re.sub(r"```.*?```", "", body, flags=re.S)
        prose += [line.strip() for line in text.splitlines()
                  if len(line.strip()) > 40 and not re.search(r"[`${}\\*_\[\]<>]", line)]
    return [c for c in code if c not in elsewhere], [p for p in prose if p not in elsewhere]


# --------------------------------------------------------------------------------------------
# the notebooks


def test_every_chapter_is_a_notebook_page():
    assert {"01_on_device", "02_irb_memory", "08_profiling"} <= set(IDS)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_book_notebook_is_plain_runnable_and_output_free(page):
    notebook = make(page, "book")
    first = notebook.cells[0]
    assert first.cell_type == "code" and "find_spec(m) is None" in first.source and "pip" in first.source
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    source_code = [c.source for c in notebooks.jupytext.read(page).cells if c.cell_type == "code"]
    shown = [c.source.replace("display=True", "display=False") for c in code[1:]]  # glued tables shown
    assert shown == [s.replace("display=True", "display=False") for s in source_code]
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    leftovers = re.findall(r"(?:```|:::)\{[\w:-]+\}|\{(?:doc|cite[:\w]*|eq|glue[:\w]*|numref|ref|prf:ref|term)\}`"
                           r"|^\([\w-]+\)=$", markdown, re.M)
    assert not leftovers, f"MyST syntax left in the notebook's Markdown: {leftovers[:5]}"
    solutions = gated_blocks(page, "solution")
    assert markdown.count("#### Solution") == len(solutions)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_student_notebook_has_no_solution_and_a_cell_under_each_exercise(page):
    notebook = make(page, "student")
    text = "\n".join(c.source for c in notebook.cells)
    lines = {line.strip() for line in text.splitlines()}
    code, prose = solution_lines(page)
    leaked = [line for line in code if line in lines] + [line for line in prose if line in text]
    assert not leaked, f"solution lines in the student notebook: {leaked[:5]}"
    assert "#### Solution" not in text
    labels = [label for label, _ in gated_blocks(page, "exercise")]
    for label in labels:
        at = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "markdown" and _exercise_here(c, label, page))
        assert notebook.cells[at + 1].source == "# Your work here"
        if label in CHECKABLE:
            assert f"check({label!r}, answer)" in notebook.cells[at + 2].source
    assert text.count("check(") == sum(label in CHECKABLE for label in labels)


def _exercise_here(cell, label: str, page: Path) -> bool:
    """Is ``cell`` the notebook cell of exercise ``label``? (its title, as the page gives it)"""
    title = re.search(r"```\{exercise-start\} ([^\n]*)\n:label: " + re.escape(label), page.read_text())
    return bool(title) and f"#### Exercise: {title.group(1).strip()}" in cell.source


@pytest.mark.slow
@pytest.mark.parametrize("name, edition", [("quickstart", "book"), ("02_irb_memory", "student")])
def test_notebook_runs_top_to_bottom_in_a_fresh_kernel(tmp_path, name, edition):
    notebook = make(REPO / "book" / f"{name}.md", edition)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                        for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    if edition == "student":
        assert outputs.count("No answer yet") == sum(label in CHECKABLE for label, _ in
                                                      gated_blocks(REPO / "book" / f"{name}.md", "exercise"))


# --------------------------------------------------------------------------------------------
# the student edition


def executed_notebooks_are_fresh() -> bool:
    """Are this checkout's executed notebooks newer than every source they were built from?"""
    executed = sorted((BUILD / "jupyter_execute").rglob("*.ipynb"))
    if not executed:
        return False
    sources = [*REPO.glob("book/**/*.md"), *REPO.glob("book/_ext/*.py"), *REPO.glob("mobiletl_edu/**/*.py"),
               REPO / "_config.yml", REPO / "_toc.yml"]
    return min(p.stat().st_mtime for p in executed) > max(p.stat().st_mtime for p in sources)


@pytest.fixture(scope="module")
def student_edition(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("student")
    env = {**os.environ, "MOBILETL_EDITION": "student", "MOBILETL_REPO_URL": DUMMY_REPO,
           "MOBILETL_JUPYTERHUB_URL": DUMMY_HUB, "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    reused = executed_notebooks_are_fresh()
    if reused:
        env["MOBILETL_REUSE_EXECUTED"] = str(BUILD / "jupyter_execute")
    jb = Path(sys.executable).with_name("jb")
    started = time.monotonic()
    proc = subprocess.run([str(jb), "build", str(REPO), "-W", "-n", "--keep-going", "--all", "--path-output",
                           str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT_S)
    log = proc.stdout
    (BUILD / "student-test.log").parent.mkdir(exist_ok=True)
    (BUILD / "student-test.log").write_text(log)
    html_dir = out / "_build" / "html"
    reports = sorted((html_dir / "reports").glob("*")) if (html_dir / "reports").is_dir() else []
    assert proc.returncode == 0 and not reports, f"student edition build failed:\n{log[-6000:]}"
    print(f"student edition built in {time.monotonic() - started:.0f} s, outputs "
          f"{'reused' if reused else 'executed'}", file=sys.stderr)
    # in cache mode myst-nb writes the notebooks without the outputs it took from the cache
    executed = BUILD / "jupyter_execute" if reused else out / "_build" / "jupyter_execute"
    return {"html": html_dir, "executed": executed, "log": log, "reused": reused}


def page_text(path: Path) -> str:
    """A page's visible text: tags dropped, entities decoded, whitespace collapsed."""
    raw = path.read_text()
    raw = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", raw)).split())


def solution_outputs(executed: Path, page: Path) -> list[str]:
    """Output lines of the page's solution cells (and of no other cell), from its executed notebook."""
    notebook = nbformat.read(executed / f"book/{page.stem}.ipynb", as_version=4)
    code, _ = solution_lines(page)
    mine, others = [], set()
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        lines = [" ".join(line.split()) for o in cell.outputs
                 for line in (str(o.get("text", "")) + "\n" + str(o.get("data", {}).get("text/plain", ""))).splitlines()]
        in_solution = any(line.strip() in code for line in cell.source.splitlines())
        (mine.extend if in_solution else others.update)(line for line in lines if len(line) > 20)
    return [line for line in mine if line not in others]


@pytest.mark.slow
def test_student_edition_shows_every_exercise_and_no_solution(student_edition):
    html_dir, problems, checked_outputs = student_edition["html"], [], 0
    for page in PAGES:
        built = html_dir / "book" / f"{page.stem}.html"
        raw, text = built.read_text(), page_text(built)
        if re.search(r'class="[^"]*\bsolution\b', raw):
            problems.append(f"{page.stem}: a solution element")
        code, prose = solution_lines(page)
        problems += [f"{page.stem}: solution line {line!r}" for line in code + prose
                     if re.search(r"(?<![\w.])" + re.escape(" ".join(line.split())), text)]
        outputs = solution_outputs(student_edition["executed"], page)
        checked_outputs += len(outputs)
        problems += [f"{page.stem}: solution output {line!r}" for line in outputs if line in text]
        for label, body in gated_blocks(page, "exercise"):
            words = " ".join(re.sub(r"[`${}\\*]", " ", body).split()[:6])
            if f'id="{label}"' not in raw:
                problems.append(f"{page.stem}: exercise {label} missing")
            elif not re.search(r"[A-Za-z]", words) or words.split()[0] not in text:
                problems.append(f"{page.stem}: the statement of {label} is missing")
    assert not problems, "\n".join(problems[:20])
    assert checked_outputs > 10, "the solution outputs to look for were not found"
    if student_edition["reused"]:
        assert "Executing notebook" not in student_edition["log"], "outputs were to be reused, not executed"


@pytest.mark.slow
def test_student_edition_launch_buttons_open_the_student_notebooks(student_edition):
    html_dir = student_edition["html"]
    for page in PAGES:
        raw = (html_dir / "book" / f"{page.stem}.html").read_text()
        path = f"student/_sources/book/{page.stem}.ipynb"
        expected = {
            "Binder": f"https://mybinder.org/v2/gh/example-org/mobiletl-edu/gh-pages?urlpath=tree/{path}",
            "Colab": f"https://colab.research.google.com/github/example-org/mobiletl-edu/blob/gh-pages/{path}",
            "JupyterHub": (f"{DUMMY_HUB}/hub/user-redirect/git-pull?repo=https%3A//github.com/example-org/mobiletl-edu"
                           f"&branch=gh-pages&urlpath=tree/mobiletl-edu/{path}"),
        }
        hrefs = {html.unescape(h) for h in re.findall(r'href="([^"]*)"', raw)}
        for provider, url in expected.items():
            assert url in hrefs, f"{page.stem}: no {provider} button to {url}"
        notebook = nbformat.read(html_dir / "_sources" / "book" / f"{page.stem}.ipynb", as_version=4)
        assert "mobiletl-edu @ git+https://github.com/example-org/mobiletl-edu@main" in notebook.cells[0].source
        assert "#### Solution" not in "\n".join(c.source for c in notebook.cells)


def test_launch_urls_for_other_hosts():
    """Binder takes any git URL; Colab only opens GitHub; no provider configured, no button."""
    urls = classroom.launch_urls("https://gitlab.example.org/a/b.git", "pages", "x.ipynb",
                                 {"binderhub_url": "https://mybinder.org", "colab_url": "https://colab.example"})
    assert urls == {"Binder": "https://mybinder.org/v2/git/https%3A%2F%2Fgitlab.example.org%2Fa%2Fb.git/pages"
                              "?urlpath=tree/x.ipynb"}
    assert classroom.launch_urls(DUMMY_REPO, "main", "x.ipynb", {}) == {}


# --------------------------------------------------------------------------------------------
# the book as `make book` builds it, without a repository URL


@pytest.mark.slow
def test_book_has_notebooks_to_download_and_no_launch_buttons():
    html_dir = BUILD / "html"
    if not (html_dir / "index.html").is_file():
        message = "no book build in _build/html (tests/test_book.py builds it first in a full run)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message)
        pytest.skip(message)
    for page in PAGES:
        raw = (html_dir / "book" / f"{page.stem}.html").read_text()
        assert "launch-buttons" not in raw and "mybinder.org" not in raw and "colab.research" not in raw
        assert f"_sources/book/{page.stem}.ipynb" in raw, f"{page.stem}: no notebook download"
        notebook = nbformat.read(html_dir / "_sources" / "book" / f"{page.stem}.ipynb", as_version=4)
        assert "PACKAGE = 'mobiletl-edu'" in notebook.cells[0].source
