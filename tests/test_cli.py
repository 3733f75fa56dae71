"""The command line: readable output, and user errors as one line with exit status 2."""
import subprocess
import sys

import pytest

from mobiletl_edu.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", *args], capture_output=True, text=True)


def test_summary_prints_the_prepared_model(capsys):
    assert main(["summary", "--model", "mobilenet_v3_small", "--method", "mobiletl", "--blocks", "2"]) == 0
    out = capsys.readouterr().out
    assert "features.11" in out and "BN shift-only" in out and "Hardswish sign (1-bit)" in out


@pytest.mark.parametrize("args, message", [
    (["summary", "--method", "ft-all", "--blocks", "3"], "does not take blocks"),
    (["summary", "--blocks", "12"], "between 1 and 11"),
    (["summary", "--method", "nope"], "invalid choice: 'nope'"),
])
def test_user_errors_exit_2_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_output_into_a_closed_pipe_ends_quietly():
    """Like `mobiletl-edu profile ... | head`: the reader is gone before the table is printed."""
    command = f"{sys.executable} -m mobiletl_edu.cli profile --block mbv3 --method mobiletl | true"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr
