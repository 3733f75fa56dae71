"""environment.yml (conda), pyproject.toml (pip) and the Makefile agree.

The conda file installs the package itself with ``-e .[extras]`` and pins only
what must be pinned outside pyproject's ranges (torch, torchvision). These
tests make sure that this stays true as the project grows:

* every optional-dependency group of pyproject.toml is requested, so a new
  group (say ``bench``) cannot be forgotten in the conda environment;
* every explicit pin names a package that pyproject.toml declares, and lies
  inside pyproject's version range;
* torch and torchvision are pinned exactly, to a matching pair, and to the
  same versions as the Makefile;
* the conda Python satisfies ``requires-python``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project targets 3.11
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
# Conda packages that are tools, not Python dependencies of the package.
CONDA_TOOLS = {"python", "pip", "nodejs"}
# Packages that need an exact pin everywhere (a range makes pip fetch GBs).
MUST_PIN = {"torch", "torchvision"}
# Conda names that are the same project as a PyPI name.
CONDA_ALIASES = {"pytorch": "torch"}


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def env() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text())


def _declared(pyproject: dict) -> dict[str, Requirement]:
    """Every requirement pyproject declares, base and optional, by name."""
    project = pyproject["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for group in project.get("optional-dependencies", {}).values():
        reqs.extend(Requirement(r) for r in group)
    out: dict[str, Requirement] = {}
    for req in reqs:
        name = canonicalize_name(req.name)
        if name in out:  # the same package in two groups: both ranges apply
            out[name].specifier &= req.specifier
        else:
            out[name] = req
    return out


def _conda_deps(env: dict) -> list[str]:
    return [d for d in env["dependencies"] if isinstance(d, str)]


def _pip_lines(env: dict) -> list[str]:
    sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(sections) == 1, "environment.yml needs exactly one pip: section"
    return [str(line).strip() for line in sections[0]]


def _editable(env: dict) -> tuple[str, set[str]]:
    lines = [line for line in _pip_lines(env) if line.startswith("-e")]
    assert len(lines) == 1, "environment.yml must install the package once with -e"
    m = re.fullmatch(r"-e\s+([^\[\s]+)(?:\[([^\]]*)\])?", lines[0])
    assert m, f"cannot parse {lines[0]!r}"
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    return m.group(1), extras


def _pins(env: dict) -> dict[str, Requirement]:
    reqs = [Requirement(line) for line in _pip_lines(env) if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def _exact(req: Requirement) -> Version:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not an exact pin"
    return Version(specs[0].version)


def test_conda_forge_python_311(env: dict, pyproject: dict) -> None:
    assert env.get("name") == "mobiletl-edu"
    assert env.get("channels") == ["conda-forge"], "use conda-forge only"
    pythons = [d for d in _conda_deps(env) if re.match(r"python\b", d)]
    assert pythons == ["python=3.11"], pythons
    requires = SpecifierSet(pyproject["project"]["requires-python"])
    assert Version("3.11") in requires
    assert "pip" in _conda_deps(env)


def test_package_installed_with_every_extra(env: dict, pyproject: dict) -> None:
    path, extras = _editable(env)
    assert path == ".", "the -e line must install this repository"
    groups = set(pyproject["project"].get("optional-dependencies", {}))
    assert extras == groups, (
        f"environment.yml requests extras {sorted(extras)} but pyproject.toml "
        f"defines {sorted(groups)}"
    )


def test_same_dependencies(env: dict, pyproject: dict) -> None:
    """What the conda env installs by name is exactly what pyproject declares."""
    declared = _declared(pyproject)
    pins = _pins(env)
    _, extras = _editable(env)
    project = pyproject["project"]
    via_editable = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    for group in extras:
        via_editable |= {
            canonicalize_name(Requirement(r).name)
            for r in project["optional-dependencies"].get(group, [])
        }
    undeclared = set(pins) - set(declared)
    assert not undeclared, f"environment.yml pins packages pyproject.toml lacks: {undeclared}"
    assert via_editable | set(pins) == set(declared)

    # Conda-level packages must not install a second copy of a pip dependency.
    for dep in _conda_deps(env):
        name = canonicalize_name(re.split(r"[=<>!\s]", dep, maxsplit=1)[0])
        if name in CONDA_TOOLS:
            continue
        name = CONDA_ALIASES.get(name, name)
        assert name not in declared, f"{dep} duplicates the pip dependency {name}"


def test_pins_lie_inside_pyproject_ranges(env: dict, pyproject: dict) -> None:
    declared = _declared(pyproject)
    for name, pin in _pins(env).items():
        version = _exact(pin) if name in MUST_PIN else None
        if version is not None:
            assert declared[name].specifier.contains(version, prereleases=True), (
                f"environment.yml pins {pin} outside pyproject's {declared[name]}"
            )
        else:
            # A non-exact requirement must at least overlap pyproject's range:
            # check its own lower bounds are allowed there.
            for spec in pin.specifier:
                if spec.operator in ("==", ">=", "~="):
                    assert declared[name].specifier.contains(spec.version, prereleases=True)


def test_torch_pair_is_exact_and_matches_makefile(env: dict) -> None:
    pins = _pins(env)
    assert MUST_PIN <= set(pins), f"environment.yml must pin {sorted(MUST_PIN)} exactly"
    torch_v, vision_v = _exact(pins["torch"]), _exact(pins["torchvision"])
    # torchvision 0.(N+15) is the release built for torch 2.N.
    assert torch_v.major == 2 and vision_v.major == 0
    assert vision_v.minor == torch_v.minor + 15, f"torch {torch_v} vs torchvision {vision_v}"

    makefile = (REPO / "Makefile").read_text()
    m = re.search(r"^TORCH_PINS\s*:?=\s*(.+)$", makefile, re.MULTILINE)
    assert m, "Makefile has no TORCH_PINS"
    make_pins = {canonicalize_name(Requirement(p).name): Requirement(p) for p in m.group(1).split()}
    assert {k: str(v) for k, v in make_pins.items()} == {
        k: str(pins[k]) for k in MUST_PIN
    }, "Makefile TORCH_PINS and environment.yml disagree"

    m = re.search(r"^EXTRAS\s*:?=\s*(.+)$", makefile, re.MULTILINE)
    assert m, "Makefile has no EXTRAS"
    assert set(m.group(1).strip().split(",")) == _editable(env)[1]
