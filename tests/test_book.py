"""The book builds strictly, and every built page works in a real browser.

The session fixture runs the same strict build as ``make book`` (warnings are
errors, nitpicky references, every notebook executed from scratch). The
browser test then opens every HTML page in headless Debian Chromium, served
from a throw-away HTTP server on 127.0.0.1, and checks what a reader would
see: no failed cells, typeset math, loaded images and working internal links.

Chromium and ChromeDriver come from Debian (``make setup`` installs them);
``MOBILETL_CHROMIUM`` / ``MOBILETL_CHROMEDRIVER`` point elsewhere. Without
them the browser test fails when ``CI=true`` and is skipped otherwise.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
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

pytestmark = pytest.mark.slow


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


def test_book_builds(built_book: Path) -> None:
    assert (built_book / "index.html").is_file()
    log = (BUILD / "build.log").read_text()
    assert "build succeeded" in log


def test_every_toc_page_is_built(built_book: Path) -> None:
    files = toc_files()
    assert "book/intro" in files and "book/references" in files
    missing = []
    for name in files:
        stem = str(Path(name).with_suffix("")) if Path(name).suffix in {".md", ".ipynb"} else name
        if not (built_book / f"{stem}.html").is_file():
            missing.append(name)
    assert not missing, f"pages listed in _toc.yml but not built: {missing}"


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


# Runs in the page: wait for MathJax (when the page loads it), then report
# what the checks below need in one round trip.
_INSPECT_JS = r"""
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


def test_every_page_renders_in_chromium(built_book: Path, server: str, browser) -> None:
    pages = _pages(built_book)
    assert pages, "no HTML pages were built"
    problems: list[str] = []
    typeset_pages = 0
    for page in pages:
        rel = page.relative_to(built_book).as_posix()
        browser.get(f"{server}/{rel}")
        report = browser.execute_async_script(_INSPECT_JS)
        if "scriptError" in report:
            problems.append(f"{rel}: inspection script failed: {report['scriptError']}")
            continue
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
