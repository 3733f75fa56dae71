"""Build the graded assignments: each ``assignments/NAME.md`` (a MyST notebook in otter-grader's format)
becomes ``OUT/NAME/student/NAME.ipynb`` (solutions and hidden tests removed) and
``OUT/NAME/autograder/`` (the solution notebook and the autograder zip that ``otter run`` and
Gradescope grade with).

    python assignments/build.py [--out _build/assignments] [--no-run-tests] [NAME ...]

By default otter also runs every test against the solution while it builds. ``make assignments``
calls this script; tests/test_assignments.py imports it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jupytext

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("*.md") if p.name != "README.md")


def otter_command() -> list[str]:
    """The otter CLI of this interpreter's environment (``python -m otter`` as a fallback)."""
    found = Path(sys.executable).with_name("otter")
    return [str(found)] if found.exists() else [sys.executable, "-m", "otter"]


def build(name: str, out: Path, run_tests: bool = True) -> Path:
    """Convert one master to a notebook and let ``otter assign`` split it; returns ``out / name``."""
    source = HERE / f"{name}.md"
    if not source.is_file():
        choices = ", ".join(p.stem for p in SOURCES)
        raise SystemExit(f"no assignment {name!r} in {HERE}; valid choices: {choices}")
    target = out / name
    with tempfile.TemporaryDirectory(prefix=f"otter-{name}-") as tmp:
        master = Path(tmp) / f"{name}.ipynb"
        jupytext.write(jupytext.read(source), master)
        staged = Path(tmp) / "dist"
        command = [*otter_command(), "assign", *([] if run_tests else ["--no-run-tests"]), str(master), str(staged)]
        subprocess.run(command, check=True, cwd=tmp)
        shutil.rmtree(target, ignore_errors=True)  # replace the old build only once the new one exists
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", default=[p.stem for p in SOURCES], help="assignments to build")
    parser.add_argument("--out", type=Path, default=Path("_build/assignments"))
    parser.add_argument("--no-run-tests", action="store_true", help="skip otter's run of the tests on the solution")
    args = parser.parse_args(argv)
    for name in args.names:
        target = build(name, args.out, run_tests=not args.no_run_tests)
        print(f">> {name}: {target / 'student'} (students), {target / 'autograder'} (grading)")


if __name__ == "__main__":
    main()
