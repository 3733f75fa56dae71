"""The command line: readable output, and user errors as one line with exit status 2."""
import subprocess
import sys
import textwrap

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


HELP_WITHOUT_TORCH = textwrap.dedent("""
    import argparse, sys
    from mobiletl_edu.cli import build_parser, main
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for argv in [[], *([name] for name in sub.choices)]:
        try:
            main([*argv, "--help"])
        except SystemExit as done:
            assert done.code == 0, argv
        assert "torch" not in sys.modules, f"{argv} --help imported torch"
    import mobiletl_edu
    assert "torch" not in sys.modules, "import mobiletl_edu imported torch"
    print("checked", len(sub.choices))
""")


def test_help_of_every_subcommand_answers_without_importing_torch():
    """--help reads the choice lists from mobiletl_edu.choices; torch loads only when a command runs."""
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split("checked")[1]) >= 5


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("summary", "train", "pretrain", "experiment", "profile"):
        assert name in result.stdout


def test_lazy_package_exports_still_import():
    code = ("from mobiletl_edu import METHODS, MODEL_NAMES, build_model, prepare, profile, profile_model, summary;"
            "import mobiletl_edu; assert set(mobiletl_edu.__all__) <= set(dir(mobiletl_edu));"
            "print(prepare.__module__, profile_model.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mobiletl_edu.methods", "mobiletl_edu.profiler"]


@pytest.mark.parametrize("args, bad, valid", [
    (["train", "--threads", "0"], "'0'", "positive integer"),
    (["train", "--threads", "-1"], "'-1'", "positive integer"),
    (["train", "--lr", "inf"], "'inf'", "finite number > 0"),
    (["train", "--lr", "nan"], "'nan'", "finite number > 0"),
    (["train", "--lr", "0"], "'0'", "finite number > 0"),
    (["train", "--lr", "-0.001"], "'-0.001'", "finite number > 0"),
    (["train", "--lr=-1e-3"], "'-1e-3'", "finite number > 0"),
    (["train", "--bn-momentum", "0"], "'0'", "(0, 1]"),
    (["train", "--dataset", "imagenet"], "'imagenet'", "offline-target"),
    (["experiment", "--epochs", "0"], "'0'", "positive integer"),
    (["pretrain", "--threads", "0"], "'0'", "positive integer"),
])
def test_bad_values_are_refused_on_one_line(args, bad, valid):
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert bad in lines[0] and valid in lines[0]
