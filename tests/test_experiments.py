"""Experiment grids, the results table, the Pareto plot and the launchers (mobiletl_edu.experiments)."""
import json

import pytest
import torch

from mobiletl_edu import experiments as E
from mobiletl_edu.cli import build_parser, main
from mobiletl_edu.experiments import PRESETS, TABLE3_METHODS, Grid
from mobiletl_edu.methods import METHODS
from mobiletl_edu.models import MODEL_NAMES
from mobiletl_edu.train import TrainConfig

TINY = {"weights": "source", "resolution": 32, "limit": 16, "epochs": 1}


def test_a_grid_crosses_models_methods_blocks_datasets_and_seeds():
    grid = Grid(methods=("ft-last", "mobiletl", "ft-blocks:5"), blocks=(1, 3), seeds=(0, 1))
    pairs = grid.method_blocks()
    assert pairs == [("ft-last", None), ("mobiletl", 1), ("mobiletl", 3), ("ft-blocks", 5)]
    runs = grid.runs()
    assert len(runs) == 4 * 2 and all(isinstance(r, TrainConfig) for r in runs)
    assert len({r.run_name() for r in runs}) == len(runs)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        Grid(methods=("nope",)).runs()
    with pytest.raises(ValueError, match="unknown run settings"):
        Grid(settings={"epoch": 3}).runs()


def test_presets_list_the_papers_experiments():
    assert set(PRESETS) == {"offline", "table3", "table4", "figure5", "figure6", "figure7"}
    for name, grid in PRESETS.items():
        runs = grid.runs()  # every value resolves: known models, methods, datasets
        assert runs and grid.description, name
    table3 = PRESETS["table3"].runs()
    assert {r.method for r in table3} == set(TABLE3_METHODS) and {r.model for r in table3} == {"proxyless_mobile"}
    assert {r.dataset for r in table3} == {"cifar100"} and {r.seed for r in table3} == {0, 1, 2, 3}
    assert {r.method for r in PRESETS["table4"].runs()} == {"ft-blocks", "remove-se", "relu", "mobiletl"}
    assert {r.method for r in PRESETS["figure6"].runs()} >= {m for m in METHODS if m.startswith("mobiletl-")}
    assert {r.model for r in PRESETS["figure7"].runs()} == set(MODEL_NAMES)
    offline = PRESETS["offline"].runs()
    assert {r.method for r in offline} == set(TABLE3_METHODS) and {r.blocks for r in offline} == {None, 3}


def test_pareto_front():
    points = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 60.0), (0.5, 40.0), (4.0, 70.0)]
    assert E.pareto_front(points) == [4, 0, 1, 5]
    assert E.pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # equal points do not beat each other


def _summary(method, seed, top1, blocks=None):
    config = TrainConfig(method=method, blocks=blocks, seed=seed, **TINY).resolved()
    return {"config": vars(config), "num_classes": 5, "trainable_parameters": 100, "stored_activation_bytes": 2e6,
            "final": {"test_top1": top1, "peak_memory_bytes": 5e8}}


def test_the_table_gives_mean_and_sample_std_over_seeds():
    rows = E.results_table([_summary("ft-last", 0, 80.0), _summary("ft-last", 1, 82.0),
                            _summary("mobiletl", 0, 90.0, 3)])
    assert [(r["method"], r["seeds"]) for r in rows] == [("ft-last", 2), ("mobiletl", 1)]
    assert rows[0]["top1_mean"] == 81.0 and rows[0]["top1_std"] == pytest.approx(2 ** 0.5, abs=1e-3)
    assert rows[1]["top1_std"] == 0.0
    assert rows[0]["stored_activation_mb"] == 2.0 and rows[0]["peak_memory_mb"] == 500.0
    assert rows[0]["training_mflops"] < rows[1]["training_mflops"]  # the profiler's FLOPs
    markdown = E.markdown_table(rows)
    assert "| 81.00 ± 1.41 |" in markdown and markdown.count("\n") == 3


def test_the_plot_marks_the_pareto_front_and_sizes_markers_by_flops():
    rows = E.results_table([_summary("ft-last", 0, 80.0), _summary("ft-all", 0, 85.0),
                            _summary("mobiletl", 0, 88.0, 3)])
    figure = E.plot_accuracy_vs_memory(rows)
    ax = figure.axes[0]
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front"][0]
    points = [(r["stored_activation_mb"], r["top1_mean"]) for r in rows]
    assert list(front.get_xdata()) == [points[i][0] for i in E.pareto_front(points)]
    sizes = [float(c.get_sizes()[0]) for c in ax.collections if hasattr(c, "get_sizes") and len(c.get_sizes())]
    assert len(set(sizes)) == 3  # FLOPs differ, so do the marker areas


def test_a_local_grid_runs_resumes_and_writes_the_table(tmp_path, monkeypatch):
    grid = Grid(methods=("ft-last", "mobiletl:1"), seeds=(0, 1), settings=TINY)
    summaries = E.run_grid(grid, tmp_path, progress=False)
    assert len(summaries) == 4
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["blocks"], r["seeds"]) for r in rows] == [("ft-last", None, 2), ("mobiletl", 1, 2)]
    assert all(r["training_mflops"] > 0 and r["analytic_memory_mb"] > 0 for r in rows)
    assert (tmp_path / "accuracy_vs_memory.png").stat().st_size > 0
    assert "top-1" in (tmp_path / "results.md").read_text()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(E, "train_or_resume", must_not_run)
    assert len(E.run_grid(grid, tmp_path, progress=False)) == 4  # all finished: nothing runs


def test_the_submitit_local_executor_runs_the_grid(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs are subprocesses
    grid = Grid(methods=("ft-last",), seeds=(0, 1), settings=TINY)
    summaries = E.run_grid(grid, tmp_path, launcher="submitit",
                           executor_options={"cluster": "local", "timeout_min": 10}, progress=False)
    assert sorted(s["config"]["seed"] for s in summaries) == [0, 1]
    assert (tmp_path / "submitit").is_dir() and (tmp_path / "results.csv").is_file()


def test_torchrun_command_carries_the_config_to_the_cli(tmp_path):
    config = TrainConfig(method="mobiletl", deterministic=False, **TINY).resolved()
    command = E.torchrun_command(config, tmp_path / "run", 4, {"data_root": "/data", "device": "cuda"})
    assert command[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=4" in command
    args = build_parser().parse_args(command[command.index("train"):])
    assert (args.method, args.blocks, args.limit, args.deterministic, args.data_root, args.device) == (
        "mobiletl", 3, 16, False, "/data", "cuda")


def test_cli_experiment_runs_a_grid_and_rebuilds_the_table(tmp_path, capsys):
    common = ["experiment", "--methods", "ft-last", "--seeds", "0", "--epochs", "1", "--resolution", "32",
              "--limit", "16", "--out", str(tmp_path), "--quiet"]
    assert main(common) == 0
    assert "| offline-target | mobilenet_v3_small | ft-last | - | 1 |" in capsys.readouterr().out
    (tmp_path / "results.csv").unlink()
    assert main([*common, "--table-only"]) == 0 and (tmp_path / "results.csv").is_file()
    assert main(["experiment", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def _poison_at(step):
    """An optimizer step hook that makes the weights NaN at the ``step``-th step of this process."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    count = [0]

    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == step:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))
    return register_optimizer_step_post_hook(hook)


GRID_FLAGS = ["experiment", "--methods", "ft-last", "ft-bias", "--seeds", "0", "--epochs", "1", "--resolution", "32",
              "--limit", "16", "--quiet"]


def test_a_failed_run_is_named_recorded_and_the_grid_goes_on(tmp_path, capsys):
    handle = _poison_at(1)  # the first run (ft-last) diverges at its first step
    try:
        assert main([*GRID_FLAGS, "--out", str(tmp_path)]) == 1
    finally:
        handle.remove()
    captured = capsys.readouterr()
    assert "run 1 of 2: mobilenet_v3_small-ft-last-offline-target-seed0" in captured.err
    assert "run 1 of 2 FAILED: mobilenet_v3_small-ft-last-offline-target-seed0" in captured.err
    assert "run 2 of 2 done: mobilenet_v3_small-ft-bias-offline-target-seed0: test top-1" in captured.err
    assert "1 run(s) failed" in captured.err and "--retry-failed" in captured.err
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert list(failed) == ["mobilenet_v3_small-ft-last-offline-target-seed0"]
    assert "training loss became nan" in failed["mobilenet_v3_small-ft-last-offline-target-seed0"]["error"]
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert rows["ft-last"]["top1_mean"] is None and rows["ft-last"]["failed_seeds"] == "0"
    assert rows["ft-bias"]["top1_mean"] is not None and "| ft-last | - | 0 | failed |" in captured.out

    assert main([*GRID_FLAGS, "--out", str(tmp_path)]) == 1  # a rerun leaves the failed run alone ...
    assert "1 run(s) failed before and are left out" in capsys.readouterr().err
    assert main([*GRID_FLAGS, "--out", str(tmp_path), "--retry-failed"]) == 0  # ... unless asked
    assert json.loads((tmp_path / "failed.json").read_text()) == {}
    assert all(r["top1_mean"] is not None for r in json.loads((tmp_path / "results.json").read_text()))


def test_ctrl_c_writes_the_partial_table_and_says_how_to_resume(tmp_path, capsys):
    from torch.optim.optimizer import register_optimizer_step_post_hook
    count = [0]

    def interrupt(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == 3:  # the second run's first step (16 images, batch 8: two steps a run)
            raise KeyboardInterrupt
    handle = register_optimizer_step_post_hook(interrupt)
    try:
        assert main([*GRID_FLAGS, "--out", str(tmp_path)]) == 130
    finally:
        handle.remove()
    error = capsys.readouterr().err
    assert "1 of 2 runs finished, partial table in" in error
    assert error.strip().endswith("with: mobiletl-edu " + " ".join([*GRID_FLAGS, "--out", str(tmp_path)]))
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())] == ["ft-last"]
    assert main([*GRID_FLAGS, "--out", str(tmp_path)]) == 0  # the printed command finishes the grid
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2


def test_table_only_on_an_empty_grid_says_there_is_nothing_to_plot(tmp_path, capsys):
    assert main([*GRID_FLAGS, "--out", str(tmp_path), "--table-only"]) == 0
    assert "nothing to tabulate or plot" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
