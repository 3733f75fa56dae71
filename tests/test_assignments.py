"""The graded assignments build with otter-grader and their autograders grade as they should.

Each master in ``assignments/`` is split by ``otter assign`` (through ``assignments/build.py``, the
script ``make assignments`` runs). The autograder zip then grades, with ``otter run``, the solution
notebook (full marks) and the same notebook with one typical slip added at its end (less).
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "assignments"))
import build as assignments  # noqa: E402

pytestmark = pytest.mark.slow

# assignment -> (question, a cell a student might end that question with: a typical slip)
SLIPS = {
    "irb_memory": ("q1", "mbv2_stored = 8 * mbv2_stored  # bits where bytes were asked"),
    "batchnorm_gradients": ("q3", "def stored_bytes_frozen(N, C, H, W):\n    return 4 * N * C * H * W  # the input"),
    "sign_bitpacking": ("q1", "def pack(mask):\n    return mask.reshape(-1).to(torch.uint8)  # a byte per element"),
}


def test_every_assignment_has_a_slip():
    assert sorted(SLIPS) == sorted(p.stem for p in assignments.SOURCES)
    assert len(SLIPS) >= 3


def test_masters_stay_out_of_the_book():
    toc = (REPO / "_toc.yml").read_text()
    config = (REPO / "_config.yml").read_text()
    assert "assignments" not in toc and "assignments/*" in config


def grade(autograder: Path, notebook: Path, out: Path) -> dict[str, tuple[float, float]]:
    """{question: (score, possible)} that the assignment's autograder zip gives ``notebook``."""
    (archive,) = autograder.glob("*-autograder_*.zip")
    out.mkdir()
    subprocess.run([*assignments.otter_command(), "run", "-a", str(archive), "-o", str(out), str(notebook)],
                   check=True, capture_output=True, text=True)
    tests = json.loads((out / "results.json").read_text())["tests"]
    return {t["name"]: (t["score"], t["max_score"]) for t in tests if t.get("max_score") is not None}


def with_slip(solution: Path, question: str, slip: str, out: Path) -> Path:
    """The solution notebook with ``slip`` run just before the question is checked."""
    notebook = nbformat.read(solution, as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if cell.source.strip() == f'grader.check("{question}")')
    notebook.cells.insert(at, nbformat.v4.new_code_cell(slip))
    out.mkdir()
    nbformat.write(notebook, out / solution.name)
    return out / solution.name


@pytest.fixture(scope="module")
def graded(tmp_path_factory) -> dict:
    """Build every assignment (otter's own test run skipped: the grading below replaces it), then grade
    each solution and each slipped solution, two at a time."""
    out = tmp_path_factory.mktemp("assignments")
    jobs = {}
    for name, (question, slip) in SLIPS.items():
        autograder = assignments.build(name, out, run_tests=False) / "autograder"
        solution = autograder / f"{name}.ipynb"
        jobs[name, "solution"] = (autograder, solution, out / f"{name}-solution-graded")
        jobs[name, "slip"] = (autograder, with_slip(solution, question, slip, out / f"{name}-slip"),
                              out / f"{name}-slip-graded")
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(grade, *job) for key, job in jobs.items()}
    return {"out": out, **{key: future.result() for key, future in futures.items()}}


@pytest.mark.parametrize("name", sorted(SLIPS))
def test_solution_gets_full_marks_and_a_slip_gets_less(graded, name):
    solution, slipped = graded[name, "solution"], graded[name, "slip"]
    assert solution and all(score == possible > 0 for score, possible in solution.values()), solution
    question = SLIPS[name][0]
    assert slipped[question][0] < slipped[question][1], slipped
    assert sum(s for s, _ in slipped.values()) < sum(p for _, p in solution.values())


@pytest.mark.parametrize("name", sorted(SLIPS))
def test_student_version_has_no_solution(graded, name):
    """The student notebook keeps the questions and public tests, and no solution line or hidden test."""
    student = graded["out"] / name / "student" / f"{name}.ipynb"
    text = "\n".join(cell.source for cell in nbformat.read(student, as_version=4).cells)
    assert "grader.check" in text and "# HIDDEN" not in text
    leaked = [line for line in solution_lines(REPO / "assignments" / f"{name}.md") if line in text]
    assert not leaked, f"solution lines in the student notebook: {leaked}"


def solution_lines(master: Path) -> list[str]:
    """Lines of the master that students must not see: code between ``# BEGIN SOLUTION`` and
    ``# END SOLUTION`` or marked ``# SOLUTION``, and the prose answers of manual questions."""
    lines, fence, in_code_solution, in_solution_block = [], None, False, False
    for line in master.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence else stripped[3:]
            continue
        if fence == "otter":
            in_solution_block = {"# BEGIN SOLUTION": True, "# END SOLUTION": False}.get(stripped, in_solution_block)
        elif fence:  # a code cell
            if stripped in ("# BEGIN SOLUTION", "# END SOLUTION"):
                in_code_solution = stripped == "# BEGIN SOLUTION"
            elif stripped.endswith("# SOLUTION") or (in_code_solution and stripped):
                lines.append(stripped.removesuffix("# SOLUTION").strip())
        elif in_solution_block and stripped:  # a manual question's written answer
            lines.append(stripped)
    assert lines, f"no solution lines found in {master}"
    return lines
