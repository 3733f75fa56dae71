"""The classroom kit in the book build: the student edition, notebooks to download, launch buttons.

jupyter-book loads this through ``sphinx.local_extensions`` in ``_config.yml``. The settings are
Sphinx config values (``sphinx.config`` in ``_config.yml``), and the Makefile sets them for one
build through the environment:

``MOBILETL_EDITION=student`` (``classroom_edition``)
    The student edition: sphinx-exercise's ``hide_solutions``, which on its own crashes on the
    book's gated solutions (sphinx-exercise issue #89), completed here by dropping everything
    from a hidden ``solution-start`` to its ``solution-end``; and the student notebooks.
``MOBILETL_REPO_URL`` (``repository.url``), ``MOBILETL_JUPYTERHUB_URL``, ``MOBILETL_NOTEBOOK_BRANCH``
    Launch buttons on every notebook page, for Binder and Colab (``launch_buttons.binderhub_url``
    and ``colab_url`` in ``_config.yml``, mybinder.org and Colab by default) and a JupyterHub
    (``launch_buttons.jupyterhub_url``). The notebooks install the package from the repository's
    ``repository.branch`` (main).
    They open the page's generated notebook where the built site is published: the branch
    ``classroom_notebook_branch`` (gh-pages), at ``_sources/<page>.ipynb``, or
    ``student/_sources/<page>.ipynb`` for the student edition. Without a repository URL there
    are no launch buttons.
``MOBILETL_REUSE_EXECUTED=DIR``
    Take the outputs of notebooks already executed in ``DIR`` (a ``make book`` run's
    ``_build/jupyter_execute``) through jupyter-cache: a page whose code cells are identical
    to an executed notebook's is not run again; any other page is.

Every MyST notebook page gets its notebook (``notebooks.chapter_notebook``) written to
``_sources/<page>.ipynb`` and offered by the theme's download button.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote, urlencode

from docutils import nodes
from sphinx.transforms import SphinxTransform
from sphinx.util import logging
from sphinx_exercise.directive import SolutionStartDirective
from sphinx_exercise.nodes import solution_end_node

sys.path.insert(0, str(Path(__file__).parent))
import notebooks  # noqa: E402

LOGGER = logging.getLogger(__name__)
ENVIRONMENT = {"classroom_edition": "MOBILETL_EDITION", "classroom_repository_url": "MOBILETL_REPO_URL",
               "classroom_jupyterhub_url": "MOBILETL_JUPYTERHUB_URL",
               "classroom_notebook_branch": "MOBILETL_NOTEBOOK_BRANCH",
               "classroom_reuse_executed": "MOBILETL_REUSE_EXECUTED"}
DEFAULT_LAUNCH = {"binderhub_url": "https://mybinder.org", "colab_url": "https://colab.research.google.com"}
SITE_PREFIX = {"book": "", "student": "student/"}


# ---------------------------------------------------------------------------------------------
# The student edition: hidden gated solutions


class hidden_solution_start(nodes.Element):
    """Where a solution hidden by ``hide_solutions`` began; removed with the solution."""


class SolutionStart(SolutionStartDirective):
    """sphinx-exercise's ``solution-start``; under ``hide_solutions`` it leaves a marker behind."""

    def run(self):
        result = super().run()  # records the gated structure sphinx-exercise checks
        return [hidden_solution_start()] if self.env.app.config.hide_solutions else result


class RemoveHiddenSolutions(SphinxTransform):
    """Drop each hidden solution: the marker, everything after it, and its ``solution-end``."""

    default_priority = 9  # before sphinx-exercise merges the gated directives (10)

    def apply(self):
        for marker in list(self.document.findall(hidden_solution_start)):
            parent = marker.parent
            start = parent.index(marker)
            end = next((i for i in range(start, len(parent.children))
                        if isinstance(parent.children[i], solution_end_node)), None)
            if end is None:
                raise ValueError(f"{self.env.docname}: a hidden solution-start without its solution-end")
            for child in parent.children[start:end + 1]:
                parent.remove(child)


# ---------------------------------------------------------------------------------------------
# Settings


def read_settings(app, config) -> None:
    for name, variable in ENVIRONMENT.items():
        if os.environ.get(variable):
            setattr(config, name, os.environ[variable])
    if config.classroom_edition not in notebooks.EDITIONS:
        raise ValueError(f"unknown edition {config.classroom_edition!r}; valid choices: "
                         f"{', '.join(notebooks.EDITIONS)}")
    if config.classroom_edition == "student":
        config.hide_solutions = True
    theme = config.html_theme_options
    project = project_config(Path(app.srcdir))
    repository = project.get("repository") or {}  # jupyter-book's own default URL does not count
    repo = (config.classroom_repository_url or repository.get("url") or "").strip().rstrip("/")
    config.classroom_repository_url = repo
    config.classroom_source_branch = repository.get("branch") or "main"
    theme_launch = project.get("launch_buttons") or {}
    launch = {}
    if repo:
        launch = {key: (theme_launch.get(key) or default).rstrip("/") for key, default in DEFAULT_LAUNCH.items()}
        hub = config.classroom_jupyterhub_url or theme_launch.get("jupyterhub_url") or ""
        if hub:
            launch["jupyterhub_url"] = hub.rstrip("/")
    config.classroom_launch = launch
    # the theme would link the MyST source (Colab cannot open it): these buttons replace its own
    theme["launch_buttons"] = {}
    if config.classroom_reuse_executed:
        reuse_outputs(app, config, Path(config.classroom_reuse_executed))


def project_config(root: Path) -> dict:
    """The book's own ``_config.yml`` (jupyter-book fills in defaults, a repository URL among them)."""
    import yaml

    path = root / "_config.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def reuse_outputs(app, config, executed: Path) -> None:
    """Put the executed notebooks in a fresh jupyter-cache and build from it (cache mode)."""
    import shutil

    from jupyter_cache import get_cache

    found = sorted(executed.rglob("*.ipynb")) if executed.is_dir() else []
    if not found:
        raise ValueError(f"MOBILETL_REUSE_EXECUTED={executed}: no executed notebooks there; run `make book` first")
    path = Path(app.outdir).parent / ".jupyter_cache_reused"
    shutil.rmtree(path, ignore_errors=True)
    cache = get_cache(str(path))
    for notebook in found:
        staged = path / "staged" / notebook.relative_to(executed)
        staged.parent.mkdir(parents=True, exist_ok=True)
        notebooks.nbformat.write(with_glue(notebook), staged)
        cache.cache_notebook_file(str(staged), check_validity=False, overwrite=True)
    config.nb_execution_mode = "cache"
    config.nb_execution_cache_path = str(path)
    LOGGER.info(f"classroom: reusing the outputs of {len(found)} executed notebooks from {executed}")


def with_glue(path: Path):
    """An executed notebook as it left the kernel: myst-nb writes the values a page glues without
    displaying them to ``<page>.glue.json`` and drops them from the cells; they go back here, as
    the glue outputs they were (their place among the outputs does not matter to myst-nb)."""
    import json

    from myst_nb.ext.glue import GLUE_PREFIX

    notebook = notebooks.nbformat.read(path, as_version=4)
    glue_file = path.with_name(path.stem + ".glue.json")
    if glue_file.is_file():
        kept = {o.get("metadata", {}).get("scrapbook", {}).get("name")
                for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])}
        cell = next(c for c in reversed(notebook.cells) if c.cell_type == "code")
        for key, output in json.loads(glue_file.read_text()).items():
            if key in kept:  # glued with display=True: still in its cell
                continue
            cell.outputs.append(notebooks.nbformat.from_dict({
                "output_type": "display_data", "data": {GLUE_PREFIX + k: v for k, v in output["data"].items()},
                "metadata": {**output.get("metadata", {}), "scrapbook": {"name": key, "mime_prefix": GLUE_PREFIX}}}))
    return notebook


# ---------------------------------------------------------------------------------------------
# Notebooks and launch buttons


def _github(repo: str):
    """(org, name) of a GitHub repository URL, or None."""
    parts = repo.split("github.com/")
    if len(parts) != 2 or parts[1].count("/") != 1:
        return None
    org, name = parts[1].split("/")
    return org, name.removesuffix(".git")


def _is_notebook_page(app, pagename: str) -> bool:
    source = app.env.doc2path(pagename)
    return str(source).endswith(".md") and "kernelspec" in app.env.metadata.get(pagename, {})


def launch_urls(repo: str, branch: str, path: str, launch: dict) -> dict:
    """{provider: URL} opening the notebook ``path`` of ``repo``'s ``branch``."""
    urls, github = {}, _github(repo)
    if "binderhub_url" in launch:
        where = f"gh/{github[0]}/{github[1]}" if github else f"git/{quote(repo, safe='')}"
        urls["Binder"] = f"{launch['binderhub_url']}/v2/{where}/{branch}?urlpath=tree/{path}"
    if "colab_url" in launch and github:
        urls["Colab"] = f"{launch['colab_url']}/github/{github[0]}/{github[1]}/blob/{branch}/{path}"
    if "jupyterhub_url" in launch:
        name = github[1] if github else repo.rstrip("/").split("/")[-1].removesuffix(".git")
        query = urlencode({"repo": repo, "branch": branch, "urlpath": f"tree/{name}/{path}"}, safe="/")
        urls["JupyterHub"] = f"{launch['jupyterhub_url']}/hub/user-redirect/git-pull?{query}"
    return urls


def _shared(app) -> dict:
    """What every page's notebook needs, computed once per build."""
    if not hasattr(app, "_classroom"):
        from mobiletl_edu import exercises

        root = Path(app.srcdir)
        bib = [root / b for b in getattr(app.config, "bibtex_bibfiles", [])]
        titles = {Path(doc).name: app.env.titles[doc].astext() for doc in app.env.found_docs if doc in app.env.titles}
        config = app.config
        repo = config.classroom_repository_url
        branch = config.classroom_source_branch
        github = _github(repo) if repo else None
        app._classroom = {
            "titles": titles,
            "citations": {k: v for b in bib if b.is_file() for k, v in notebooks.bib_citations(b).items()},
            "checkable": {label: (e.expects, e.symbols) for label, e in exercises.EXERCISES.items()},
            "package": f"mobiletl-edu @ git+{repo}@{branch}" if repo else "mobiletl-edu",
            "raw": f"https://raw.githubusercontent.com/{github[0]}/{github[1]}/{branch}/" if github else None,
        }
    return app._classroom


def write_notebook(app, pagename, templatename, context, doctree):
    """The page's notebook into ``_sources``, where the theme's download button finds it."""
    if doctree is None or not _is_notebook_page(app, pagename):
        return
    shared = _shared(app)
    source = Path(app.env.doc2path(pagename))
    folder = source.parent.relative_to(Path(app.srcdir)).as_posix()
    notebook = notebooks.chapter_notebook(
        source, app.config.classroom_edition, repo_root=Path(app.srcdir), titles=shared["titles"],
        citations=shared["citations"], checkable=shared["checkable"], package=shared["package"],
        raw_url=shared["raw"] and f"{shared['raw']}{folder}/")
    target = Path(app.outdir) / "_sources" / f"{pagename}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    notebooks.nbformat.write(notebook, target)
    context["ipynb_source"] = f"{pagename}.ipynb"


def add_launch_buttons(app, pagename, templatename, context, doctree):
    config = app.config
    if not (config.classroom_launch and "ipynb_source" in context and "header_buttons" in context):
        return
    path = f"{SITE_PREFIX[config.classroom_edition]}_sources/{pagename}.ipynb"
    urls = launch_urls(config.classroom_repository_url, config.classroom_notebook_branch, path,
                       config.classroom_launch)
    icons = {"Binder": "logo_binder.svg", "Colab": "logo_colab.png", "JupyterHub": "logo_jupyterhub.svg"}
    buttons = [{"type": "link", "text": name, "tooltip": f"Launch on {name}", "url": url,
                "icon": f"_static/images/{icons[name]}", "label": f"launch-{name.lower()}-button"}
               for name, url in urls.items()]
    context["header_buttons"].append({"type": "group", "tooltip": "Launch this page as a notebook",
                                      "icon": "fas fa-rocket", "buttons": buttons, "label": "launch-buttons"})


def setup(app):
    app.add_config_value("classroom_edition", "book", "env")
    app.add_config_value("classroom_repository_url", "", "env")
    app.add_config_value("classroom_jupyterhub_url", "", "env")
    app.add_config_value("classroom_notebook_branch", "gh-pages", "env")
    app.add_config_value("classroom_reuse_executed", "", "env")
    app.add_config_value("classroom_launch", {}, "env")
    app.add_config_value("classroom_source_branch", "main", "env")
    app.add_node(hidden_solution_start)
    app.add_directive("solution-start", SolutionStart, override=True)
    app.add_transform(RemoveHiddenSolutions)
    app.connect("config-inited", read_settings, priority=900)  # after myst-nb's own config-inited
    app.connect("html-page-context", write_notebook, priority=499)  # before the theme's buttons (501)
    app.connect("html-page-context", add_launch_buttons, priority=502)  # after them
    return {"parallel_read_safe": True, "parallel_write_safe": True}
