"""The book builds strictly, and every built page works in a real browser.

The session fixture runs the same strict build as ``make book`` (warnings are
errors, nitpicky references, every notebook executed from scratch). The
browser test then opens every HTML page in headless Debian Chromium, served
from a throw-away HTTP server on 127.0.0.1, and checks what a reader would
see: no failed cells, typeset math, loaded images and working internal links,
and none of the defects a reader notices at once: raw Markdown (``|---|`` or
``$...$`` as text), the same figure twice, content wider than its box without
its own scrollbar (or clipped), a figure without meaningful alt text, a code
cell wider than the column, an object's default repr (``<... at 0x...>``) in an
output, a ``glue`` call in a visible code cell. Each of
those checks is shown to fail on a small page that has the defect
(``test_defect_checks_catch_each_defect``). A full-page screenshot of every
page is kept under ``_build/screenshots/`` for a reviewer to look at.

Fast checks of the sources run without a build: code cells wrap at 88
columns, and the book toolchain is pinned exactly where ``make setup`` reads it.

Chromium and ChromeDriver come from Debian (``make setup`` installs them);
``MOBILETL_CHROMIUM`` / ``MOBILETL_CHROMEDRIVER`` point elsewhere. Without
them the browser test fails when ``CI=true`` and is skipped otherwise.
"""

from __future__ import annotations

import base64
import functools
import html.parser
import importlib.metadata
import http.server
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from toc import toc_files

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "_build"
HTML = BUILD / "html"
REPORTS = HTML / "reports"

# Debian's packages by default; override for another platform's browser.
CHROMIUM = Path(os.environ.get("MOBILETL_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MOBILETL_CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1024",
)
# Folders of the HTML output that hold assets, not pages of the book.
NON_PAGE_DIRS = {"_static", "_sources", "_images", "reports", "_downloads"}
BUILD_TIMEOUT_S = int(os.environ.get("MOBILETL_BOOK_TIMEOUT", "3600"))
PAGE_TIMEOUT_S = 60
# Console errors that the upstream toolchain always produces and that change
# nothing a reader sees. Anything else logged as an error fails the test.
BENIGN_CONSOLE_ERRORS = (
    # JB 1.x with Sphinx 7 emits sphinx-thebe's inline config twice, so the
    # second `const THEBE_JS_URL` is a redeclaration (thebe is off here).
    re.compile(r"Identifier 'THEBE_JS_URL' has already been declared"),
    # pydata-sphinx-theme on the first visit, before it stores a light/dark mode.
    re.compile(r"Got invalid theme mode"),
    # Chromium asks for /favicon.ico by itself; the book sets no favicon.
    re.compile(r"/favicon\.ico .*404"),
)

SCREENSHOTS = BUILD / "screenshots"
BOOK_SOURCES = REPO / "book"
CODE_COLUMNS = 88
# The book toolchain, pinned exactly in pyproject.toml's "book" extra (the README's install
# path: `make setup` installs `.[test,book]`), so a fresh clone builds the same pages.
BOOK_TOOLCHAIN = ("jupyter-book", "sphinx", "myst-nb", "myst-parser", "sphinx-book-theme",
                  "pydata-sphinx-theme", "sphinx-exercise", "sphinx-proof", "sphinxcontrib-bibtex",
                  "docutils", "ipykernel", "jupyter-client")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _jb_command() -> list[str]:
    jb = Path(sys.executable).with_name("jb")
    if jb.exists():
        return [str(jb)]
    found = shutil.which("jb")
    if found:
        return [found]
    pytest.fail("jupyter-book's `jb` command was not found; run `make setup`")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _tail(text: str, n_lines: int = 80) -> str:
    return "\n".join(_ANSI.sub("", text).splitlines()[-n_lines:])


def _failed_cells(log: str, n_lines: int = 40) -> str:
    """The part of a build log that shows which notebook cell failed, if any."""
    lines = _ANSI.sub("", log).splitlines()
    for i, line in enumerate(lines):
        if "CellExecutionError" in line or "An error occurred while executing" in line:
            return "\n".join(lines[i : i + n_lines])
    return ""


# --------------------------------------------------------------------------
# fast checks of the sources (no build)
# --------------------------------------------------------------------------

_CELL_START = re.compile(r"^(`{3,})\{code-cell\}")


def code_cells(text: str) -> list[tuple[int, list[str], list[str]]]:
    """The code cells of a MyST notebook: (first line number, metadata lines, code lines)."""
    cells, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _CELL_START.match(lines[i])
        if not m:
            i += 1
            continue
        fence, start, meta, code = m.group(1), i + 1, [], []
        i += 1
        if i < len(lines) and lines[i].strip() == "---":  # a YAML metadata block
            i += 1
            while i < len(lines) and lines[i].strip() != "---":
                meta.append(lines[i])
                i += 1
            i += 1
        while i < len(lines) and lines[i].startswith(":"):  # short-form options (":tags:")
            meta.append(lines[i])
            i += 1
        while i < len(lines) and not re.fullmatch(re.escape(fence) + r"\s*", lines[i]):
            code.append(lines[i])
            i += 1
        cells.append((start, meta, code))
        i += 1
    return cells


def _book_pages() -> list[Path]:
    return [REPO / f"{name}.md" for name in toc_files() if (REPO / f"{name}.md").is_file()]


def test_code_cells_are_wrapped_at_88_columns() -> None:
    """Every code cell of every page, hidden ones included, fits 88 columns."""
    long = []
    for page in _book_pages():
        for start, _, code in code_cells(page.read_text()):
            long += [f"{page.relative_to(REPO)}:{start + n}: {len(line)} columns"
                     for n, line in enumerate(code, 1) if len(line) > CODE_COLUMNS]
    assert not long, "code lines longer than 88 columns:\n" + "\n".join(long)


def test_glue_calls_are_hidden_in_the_sources() -> None:
    """A cell that glues is removed from the page (remove-cell or remove-input)."""
    shown = []
    for page in _book_pages():
        for start, meta, code in code_cells(page.read_text()):
            if any(re.search(r"\bglue\(", line) for line in code) and not any(
                    "remove-cell" in m or "remove-input" in m for m in meta):
                shown.append(f"{page.relative_to(REPO)}:{start}")
    assert not shown, f"cells that show their glue calls to the reader: {shown}"


def test_code_cell_parser_sees_metadata_and_code() -> None:
    text = "```{code-cell} ipython3\n:tags: [remove-cell]\n\nx = 1\n```\n\n" \
           "````{code-cell} ipython3\n---\nmystnb:\n  image:\n    alt: a\n---\ny = 2\n````\n"
    (_, meta1, code1), (_, meta2, code2) = code_cells(text)
    assert meta1 == [":tags: [remove-cell]"] and code1 == ["", "x = 1"]
    assert meta2 == ["mystnb:", "  image:", "    alt: a"] and code2 == ["y = 2"]


def test_book_toolchain_is_pinned_exactly() -> None:
    """pyproject's book extra pins every tool of the build to the version installed here."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, extras["book"])}
    problems = []
    for name in map(canonicalize_name, BOOK_TOOLCHAIN):
        req = pins.get(name)
        specs = list(req.specifier) if req else []
        if len(specs) != 1 or specs[0].operator != "==":
            problems.append(f"{name}: not pinned exactly in the book extra ({req})")
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned to {specs[0].version} but not installed")
            continue
        if not specs[0].contains(installed, prereleases=True):
            problems.append(f"{name}: pinned to {specs[0].version}, installed {installed}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------
# the strict build
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def built_book() -> Path:
    """Build the book strictly into ``_build`` once per test session."""
    mathjax = REPO / ".book-assets" / "extra" / "_static" / "mathjax" / "tex-mml-chtml.js"
    if not mathjax.is_file():
        pytest.fail(
            f"offline MathJax is missing ({mathjax.relative_to(REPO)}): run `make setup` "
            "(or just `make mathjax`) before building the book",
            pytrace=False,
        )
    # Stale failure reports from an earlier build would hide or fake a result.
    shutil.rmtree(REPORTS, ignore_errors=True)
    cmd = [*_jb_command(), "build", str(REPO), "-W", "-n", "--keep-going", "--all"]
    started = time.monotonic()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"},
    )
    elapsed = time.monotonic() - started
    BUILD.mkdir(exist_ok=True)
    (BUILD / "build.log").write_text(proc.stdout)
    failure_logs = sorted(REPORTS.glob("*.log")) if REPORTS.is_dir() else []
    if proc.returncode != 0 or failure_logs:
        reports = "\n\n".join(
            f"--- {log.name} ---\n{_tail(log.read_text(errors='replace'), 40)}"
            for log in failure_logs
        )
        cell = _failed_cells(proc.stdout)
        cell = f"--- failing cell ---\n{cell}\n\n" if cell else ""
        pytest.fail(
            f"strict book build failed (rc={proc.returncode}, {elapsed:.0f} s): "
            f"{' '.join(cmd)}\nfull log: {BUILD / 'build.log'}\n\n{cell}"
            f"--- end of the build log ---\n{_tail(proc.stdout)}\n\n{reports}",
            pytrace=False,
        )
    return HTML


@pytest.mark.slow
def test_book_builds(built_book: Path) -> None:
    assert (built_book / "index.html").is_file()
    log = (BUILD / "build.log").read_text()
    assert "build succeeded" in log


@pytest.mark.slow
def test_every_toc_page_is_built(built_book: Path) -> None:
    files = toc_files()
    assert "book/intro" in files and "book/references" in files
    missing = []
    for name in files:
        stem = str(Path(name).with_suffix("")) if Path(name).suffix in {".md", ".ipynb"} else name
        if not (built_book / f"{stem}.html").is_file():
            missing.append(name)
    assert not missing, f"pages listed in _toc.yml but not built: {missing}"


@pytest.mark.slow
def test_mathjax_is_served_from_the_book(built_book: Path) -> None:
    """Math pages load the bundled MathJax 3, never a CDN (there is no network)."""
    assert (built_book / "_static" / "mathjax" / "tex-mml-chtml.js").is_file(), (
        "MathJax was not copied into _build/html/_static/mathjax: run `make setup`"
    )
    intro = (built_book / "book" / "intro.html").read_text()
    assert "_static/mathjax/tex-mml-chtml.js" in intro
    for page in _pages(built_book):
        text = page.read_text(errors="replace")
        assert "cdn.jsdelivr.net/npm/mathjax" not in text, page


@pytest.mark.slow
def test_glued_value_reaches_the_prose(built_book: Path) -> None:
    """The quickstart prints its parameter count and glues it into the text."""
    text = (built_book / "book" / "quickstart.html").read_text()
    printed = re.search(r"parameters: (\d+)", text)
    assert printed, "the quickstart no longer prints its parameter count"
    assert f"{int(printed.group(1)):,d}" in text, "glued parameter count missing from the prose"


# --------------------------------------------------------------------------
# the browser check
# --------------------------------------------------------------------------


def _pages(html_root: Path) -> list[Path]:
    pages = []
    for path in sorted(html_root.rglob("*.html")):
        rel = path.relative_to(html_root)
        if rel.parts[0] in NON_PAGE_DIRS:
            continue
        pages.append(path)
    return pages


class _IdCollector(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key == "id" or (key == "name" and tag == "a"):
                if value:
                    self.ids.add(value)


@functools.lru_cache(maxsize=None)
def _ids_in(path: Path) -> frozenset[str]:
    parser = _IdCollector()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.ids)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature is fixed
        pass


@pytest.fixture(scope="module")
def server(built_book: Path):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = (
            f"headless browser test needs Debian's chromium and chromium-driver "
            f"({', '.join(missing)} missing); `make setup` installs them with apt-get"
        )
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:  # pragma: no cover - selenium is in the test extra
        if _in_ci():
            pytest.fail(f"selenium is not installed: {exc}", pytrace=False)
        pytest.skip(f"selenium is not installed: {exc}")

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download
    profile = tempfile.mkdtemp(prefix="mobiletl-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# Runs in a page: the defects a reader sees at once, as [{kind, detail}]. It needs no
# MathJax and no theme, so test_defect_checks_catch_each_defect runs it on small bad pages.
_DEFECTS_JS = r"""
function bookDefects() {
  const article = document.querySelector('article.bd-article') || document.querySelector('main')
                  || document.body;
  const defects = [];
  if (!article) return defects;  // a redirect page (index.html) may have no body yet
  const add = (kind, node, detail) => defects.push({kind: kind, detail: (detail ||
      (node.textContent || node.outerHTML || '')).replace(/\s+/g, ' ').trim().slice(0, 160)});
  const verbatim = 'pre, code, kbd, script, style, textarea, .math, mjx-container, .highlight';

  // 1. Raw Markdown: a table rule or $...$ math left as text outside code and math.
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(verbatim)) continue;
    const text = node.nodeValue;
    if (/\|\s*:?-{3,}:?\s*\|/.test(text)) add('raw-markdown-table', parent, text);
    if (/\$[^$\s][^$]*\$/.test(text) || /\$\$/.test(text)) add('raw-markdown-math', parent, text);
  }

  // 2. The same image twice on one page.
  const seen = new Map();
  for (const img of article.querySelectorAll('img')) {
    const src = img.currentSrc || img.src;
    seen.set(src, (seen.get(src) || 0) + 1);
  }
  for (const [src, n] of seen) if (n > 1) add('duplicate-image', document.body, `${n}x ${src}`);

  // 3. Meaningful alt text: present, a few words long, not a file name or a hash.
  for (const img of article.querySelectorAll('img')) {
    const alt = (img.getAttribute('alt') || '').trim();
    const file = (img.getAttribute('src') || '').split('/').pop();
    if (alt.length < 15 || !/\s/.test(alt) || /\.(png|svg|jpe?g|gif|webp)$/i.test(alt)
        || /^[0-9a-f]{16,}/i.test(alt) || alt === file) {
      add('missing-alt-text', img, `alt=${JSON.stringify(alt)} on ${file}`);
    }
  }

  // 4. Code cells fit the column (they are wrapped at 88 columns).
  for (const pre of article.querySelectorAll('div.cell_input pre')) {
    if (pre.scrollWidth > pre.clientWidth + 1) {
      add('code-wider-than-column', pre, `${pre.scrollWidth}px in ${pre.clientWidth}px: ` +
          pre.textContent.split('\n').reduce((a, b) => b.length > a.length ? b : a, ''));
    }
  }

  // 5. Nothing wider than its box unless a box around it scrolls; nothing clipped.
  const overflowX = el => getComputedStyle(el).overflowX;
  const scrolls = el => ['auto', 'scroll'].includes(overflowX(el));
  const clips = el => ['hidden', 'clip'].includes(overflowX(el));
  const content = article.querySelectorAll(
      'pre, table, img, svg, mjx-container, figure, p, li, dt, dd, div.cell_output, div.output');
  for (const el of content) {
    if (el.parentElement && el.parentElement.closest('svg')) continue;  // inside a drawing
    if (el.matches('mjx-container:not([display="true"])')) continue;  // inline math: a word
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (scrolls(el)) continue;  // its own box scrolls: fine however wide its content
    const spills = el.scrollWidth > el.clientWidth + 1;
    if (spills && clips(el)) { add('content-clipped', el); continue; }
    const right = spills ? Math.max(r.right, r.left + el.scrollWidth) : r.right;
    let held = false, cut = false;
    for (let box = el.parentElement; box && !held && !cut; box = box.parentElement) {
      if (scrolls(box)) held = true;  // a scroll box holds it: the reader can scroll
      else if (clips(box) && right > box.getBoundingClientRect().right + 1) cut = true;
      if (box === article) break;
    }
    if (held) continue;
    const past = Math.round(right - article.getBoundingClientRect().right);
    if (cut) add('content-clipped', el);
    else if (spills || past > 1) {
      add('wider-than-box-without-scrollbar', el, `${el.tagName.toLowerCase()} ` +
          `${el.scrollWidth}px in a ${el.clientWidth}px box, ${past}px past the column: ` +
          (el.textContent || '').slice(0, 100));
    }
  }

  // 6. A Python object's default repr in an output or a figure ("<matplotlib.legend.Legend
  // at 0x7f...>", or "<Figure size 640x480 with 1 Axes>" where a plot should be).
  for (const out of article.querySelectorAll('div.cell_output, figure')) {
    const repr = (out.textContent || '').match(
        /<[\w.]+( object)? at 0x[0-9a-f]+>|<Figure size [\d.]+x[\d.]+ with \d+ Axes>/);
    if (repr) add('raw-object-repr', out, repr[0]);
  }

  // 7. Bookkeeping left visible: a glue call in a rendered code cell.
  for (const cell of article.querySelectorAll('div.cell_input')) {
    if (/\bglue\s*\(/.test(cell.textContent)) add('visible-glue-call', cell);
  }
  return defects;
}
"""

# Runs in the page: wait for MathJax (when the page loads it), then report
# what the checks below need in one round trip.
_INSPECT_JS = _DEFECTS_JS + r"""
const done = arguments[arguments.length - 1];
(async () => {
  const report = {};
  const mathNodes = Array.from(document.querySelectorAll(
      'span.math, div.math, .amsmath, .math.notranslate'));
  report.mathCount = mathNodes.length;
  report.mathjaxLoaded = false;
  if (mathNodes.length > 0) {
    const t0 = Date.now();
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
      if (Date.now() - t0 > 30000) break;
      await new Promise(r => setTimeout(r, 100));
    }
    if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
      await MathJax.startup.promise;
      if (MathJax.typesetPromise) { await MathJax.typesetPromise(); }
      report.mathjaxLoaded = true;
    }
  }
  report.untypeset = mathNodes
      .filter(n => !n.querySelector('mjx-container') && !n.closest('mjx-container'))
      .map(n => n.textContent.trim().slice(0, 80));
  report.mjxCount = document.querySelectorAll('mjx-container').length;
  report.mathErrors = Array.from(document.querySelectorAll('mjx-merror'))
      .map(n => n.getAttribute('data-mjx-error') || n.textContent.slice(0, 80));

  const imgs = Array.from(document.images);
  for (const img of imgs) {
    img.loading = 'eager';
    img.scrollIntoView();
    if (!img.complete) {
      await new Promise(r => { img.onload = img.onerror = r; setTimeout(r, 10000); });
    }
  }
  report.brokenImages = imgs
      .filter(img => !(img.complete && img.naturalWidth > 0))
      .map(img => img.currentSrc || img.getAttribute('src'));
  report.imageCount = imgs.length;

  report.errorOutputs = Array.from(document.querySelectorAll(
      '.output.error, .output.traceback, .cell_output .error, .cell_output .traceback'))
      .map(n => n.textContent.slice(0, 300));
  report.tracebacks = Array.from(document.querySelectorAll(
      '.cell_output, .output, .output.stderr'))
      .filter(n => n.textContent.includes('Traceback'))
      .map(n => n.textContent.slice(0, 300));

  report.links = Array.from(document.querySelectorAll('a[href]'))
      .map(a => ({raw: a.getAttribute('href'), resolved: a.href}));
  report.defects = bookDefects();
  window.scrollTo(0, 0);
  done(report);
})().catch(e => done({scriptError: String(e)}));
"""

_EXTERNAL_SCHEMES = ("http:", "https:", "mailto:", "javascript:", "tel:", "data:", "ftp:")


def _check_links(page_rel: str, links: list[dict], base: str, html_root: Path) -> list[str]:
    problems = []
    for link in links:
        raw = (link["raw"] or "").strip()
        if not raw or raw.lower().startswith(_EXTERNAL_SCHEMES) or raw.startswith("//"):
            continue
        resolved = urlsplit(link["resolved"])
        if f"{resolved.scheme}://{resolved.netloc}" != base:
            problems.append(f"{page_rel}: link {raw!r} leaves the book ({link['resolved']})")
            continue
        target = html_root / unquote(resolved.path).lstrip("/")
        if resolved.path.endswith("/") or target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"{page_rel}: link {raw!r} -> missing file {target.relative_to(html_root)}")
            continue
        fragment = unquote(resolved.fragment)
        if fragment and target.suffix == ".html" and fragment not in _ids_in(target):
            problems.append(f"{page_rel}: link {raw!r} -> no anchor #{fragment} in {target.name}")
    return problems


def _screenshot(browser, path: Path) -> None:
    """The whole page as one PNG, the window's width: the viewport captured screen by screen
    and stitched. (Chrome's capture beyond the viewport shifts and blanks a long page of this
    theme.) Sticky bars become ordinary boxes first, so they do not cover each screen's top."""
    from PIL import Image

    browser.execute_script(
        "for (const el of document.querySelectorAll('*'))"
        "  if (getComputedStyle(el).position === 'sticky') el.style.position = 'relative';")
    height = max(1, browser.execute_script("return document.documentElement.scrollHeight"))
    page, y = None, 0
    while y < height:
        top = browser.execute_script(f"window.scrollTo(0, {y}); return window.scrollY;")
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
        screen = Image.open(io.BytesIO(base64.b64decode(shot["data"])))
        page = page or Image.new("RGB", (screen.width, height), "white")
        page.paste(screen.crop((0, y - top, screen.width, screen.height)), (0, y))
        y = top + screen.height
    browser.execute_script("window.scrollTo(0, 0)")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save(path)


@pytest.mark.slow
def test_every_page_renders_in_chromium(built_book: Path, server: str, browser) -> None:
    pages = _pages(built_book)
    assert pages, "no HTML pages were built"
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    problems: list[str] = []
    typeset_pages = 0
    for page in pages:
        rel = page.relative_to(built_book).as_posix()
        browser.get(f"{server}/{rel}")
        report = browser.execute_async_script(_INSPECT_JS)
        if "scriptError" in report:
            problems.append(f"{rel}: inspection script failed: {report['scriptError']}")
            continue
        _screenshot(browser, SCREENSHOTS / rel.replace(".html", ".png"))
        for defect in report["defects"]:
            problems.append(f"{rel}: {defect['kind']}: {defect['detail']}")
        if report["mathCount"]:
            if not report["mathjaxLoaded"]:
                problems.append(f"{rel}: page has math but MathJax never loaded")
            elif report["mjxCount"] == 0 or report["untypeset"]:
                problems.append(f"{rel}: math left untypeset: {report['untypeset'][:5]}")
            else:
                typeset_pages += 1
        for err in report["mathErrors"]:
            problems.append(f"{rel}: MathJax error: {err}")
        for src in report["brokenImages"]:
            problems.append(f"{rel}: image did not load: {src}")
        for text in report["errorOutputs"]:
            problems.append(f"{rel}: cell error output: {text!r}")
        for text in report["tracebacks"]:
            problems.append(f"{rel}: traceback in output: {text!r}")
        problems.extend(_check_links(rel, report["links"], server, built_book))
        for entry in browser.get_log("browser"):
            message = entry.get("message", "")
            if entry.get("level") != "SEVERE" or any(
                pattern.search(message) for pattern in BENIGN_CONSOLE_ERRORS
            ):
                continue
            problems.append(f"{rel}: browser console error: {message[:300]}")
    assert not problems, "\n".join(problems)
    # The intro and the quickstart both contain math: make sure the check bit.
    assert typeset_pages >= 2, f"MathJax typeset only {typeset_pages} page(s)"


# --------------------------------------------------------------------------
# the defect checks fail where they should
# --------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; font: 16px sans-serif; }} article {{ width: 600px; margin: 20px; }}
</style></head><body><article class="bd-article">{}</article></body></html>"""
_FIGURE = '<figure><img src="plot.svg" alt="{}"></figure>'
_GOOD = ("<p>A page with nothing wrong: $5 is not math here, nor is a | b.</p>"
         + _FIGURE.format("A line rising from left to right") +
         '<div class="cell_input"><pre>x = compute()</pre></div>'
         '<div class="cell_output"><pre style="overflow-x: auto">' + "y" * 300 + "</pre></div>"
         '<div style="overflow-x: auto"><table><tr><td>' + "z" * 300 + "</td></tr></table></div>")
# One page per defect class, and the one check that must fire on it.
_BAD_PAGES = {
    "raw-markdown-table": "<p>| layer | keeps |\n|---|---|\n| conv | input |</p>",
    "raw-markdown-math": "<p>keeps $B C H W$ bytes</p>",
    "duplicate-image": _FIGURE.format("A line rising from left to right") * 2,
    "missing-alt-text": _FIGURE.format("3f9a0c77d1e2b4a5c6d7e8f9a0b1c2d3.svg"),
    "wider-than-box-without-scrollbar": "<div class='cell_output'><pre style='overflow: visible'>"
                                        + "w" * 300 + "</pre></div>",
    "content-clipped": "<div style='overflow: hidden; width: 300px'><table><tr><td>"
                       + "c" * 300 + "</td></tr></table></div>",
    "code-wider-than-column": "<div class='cell_input'><pre style='overflow-x: auto'>"
                              + "long_name = " + "x" * 200 + "</pre></div>",
    "visible-glue-call": "<div class='cell_input'><pre>glue(\"od-batch\", BATCH)</pre></div>",
    "raw-object-repr": "<div class='cell_output'><pre>&lt;matplotlib.legend.Legend at 0x7f533aece350&gt;"
                       "</pre></div><figure><pre>&lt;Figure size 495x410 with 2 Axes&gt;</pre></figure>",
}


@pytest.mark.slow
def test_defect_checks_catch_each_defect(browser, tmp_path: Path) -> None:
    """Each defect check fires on a small page with that defect, and none fires on a clean one."""
    (tmp_path / "plot.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20"><path d="M0 20 L40 0"/></svg>')
    for name, body in {"good": _GOOD, **_BAD_PAGES}.items():
        (tmp_path / f"{name}.html").write_text(_PAGE.format(body))
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    found = {}
    try:
        for name in ("good", *_BAD_PAGES):
            browser.get(f"{base}/{name}.html")
            found[name] = [d["kind"] for d in browser.execute_script(_DEFECTS_JS + "return bookDefects();")]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert found.pop("good") == [], "a check fires on a page without defects"
    assert {name: set(kinds) for name, kinds in found.items()} == {name: {name} for name in _BAD_PAGES}, found
    assert len(found["raw-object-repr"]) == 2  # an object's repr, and a figure's repr instead of a plot
