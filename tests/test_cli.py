"""The command line: readable output, and user errors as one line with exit status 2."""
import json
import os
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
        assert main([*argv, "--help"]) == 0, argv
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
    """(That importing the package loads no torch is checked in a fresh process above.)"""
    import mobiletl_edu
    from mobiletl_edu import METHODS, load_trained, plain_model, prepare, profile_model  # noqa: F401
    assert set(mobiletl_edu.__all__) <= set(dir(mobiletl_edu))
    assert (prepare.__module__, profile_model.__module__, plain_model.__module__) == (
        "mobiletl_edu.methods", "mobiletl_edu.profiler", "mobiletl_edu.export")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mobiletl_edu.nope  # noqa: B018


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


# ---------------------------------------------------------------------------------------------
# The error contract: exit 2, one line naming the bad value and the valid choices, nothing written
# ---------------------------------------------------------------------------------------------
def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


CONTRACT = [
    (["train", "--threads", "0"], ["--threads", "'0'", "positive integer"]),
    (["train", "--threads", "-1"], ["--threads", "'-1'", "positive integer"]),
    (["train", "--device", "foo"], ["'foo'", "valid choices here: cpu"]),
    (["train", "--device", "cuda:x"], ["'cuda:x'", "valid choices here: cpu"]),
    (["train", "--lr", "nan"], ["--lr", "'nan'", "finite number > 0"]),
    (["train", "--dataset", "cifar10", "--weights", "none", "--download"],
     ["dataset 'cifar10'", "looks offline", "Place the files by hand", "cifar-10-python.tar.gz"]),
    (["train", "--weights", "imagenet", "--download"],
     ["ImageNet weights", "looks offline", "mobilenet_v3_small-047dcff4.pth", "copy it to"]),
    (["train", "--out", "missing/run"], ["missing/run", "missing does not exist"]),
    (["train", "--out", "/sys/mobiletl-run"], ["/sys/mobiletl-run", "/sys is not writable"]),
    (["experiment", "--methods", "ft-last", "--seeds", "0", "--out", "missing/grid"], ["missing does not exist"]),
    (["experiment", "--methods", "ft-last", "--seeds", "0", "--out", "/sys/grid"], ["/sys is not writable"]),
    (["experiment", "--methods", "ft-last", "--seeds", "0", "--device", "foo"], ["'foo'", "valid choices here"]),
    (["pretrain", "--out", "missing/source.pt"], ["missing does not exist"]),
    (["pretrain", "--out", "/sys/source.pt"], ["/sys is not writable"]),
]


# One child process runs every case, each in a fresh empty folder (the default runs/ and data/
# inside it) with its own torch home, through mobiletl_edu.cli.main: torch is imported once.
CONTRACT_DRIVER = textwrap.dedent("""
    import contextlib, io, json, os, sys, traceback
    from mobiletl_edu.cli import main
    results = []
    for folder, args in json.loads(sys.argv[1]):
        os.chdir(folder)
        os.environ["TORCH_HOME"] = os.path.join(folder, "torch-home")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(args)
            except BaseException:
                code, _ = "exception", err.write(traceback.format_exc())
        results.append([code, err.getvalue()])
    print(json.dumps(results))
""")


def test_every_user_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    import torch
    contract = CONTRACT + ([] if torch.cuda.is_available() else  # --device cuda on a machine without one
                           [(["train", "--device", "cuda"], ["'cuda'", "no CUDA GPU", "valid choices here: cpu"])])
    folders = [tmp_path / f"case{i}" for i in range(len(contract))]
    for folder in folders:
        folder.mkdir()
    cases = [[str(folder), args] for folder, (args, _) in zip(folders, contract)]
    child = subprocess.run([sys.executable, "-c", CONTRACT_DRIVER, json.dumps(cases)], capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr
    for folder, (args, expected), (code, error) in zip(folders, contract, json.loads(child.stdout)):
        lines = [line for line in error.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1, (args, code, error)
        assert all(part in lines[0] for part in expected), (args, lines[0])
        assert _tree(folder) == [], (args, _tree(folder))  # nothing written, no folder left


def test_the_console_command_exits_2_with_one_line(tmp_path):
    """The same contract seen from outside: the process's exit status and its whole stderr."""
    args, expected = CONTRACT[5]  # --download without a network
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch-home")}
    result = subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", *args], capture_output=True, text=True,
                            cwd=tmp_path, env={**env, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(part in result.stderr for part in expected)
    assert _tree(tmp_path) == []
