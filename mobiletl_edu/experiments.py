"""Experiment grids: models x methods x blocks x datasets x seeds -> one table and one plot.

Each grid point is an ordinary :mod:`mobiletl_edu.train` run in ``<out>/runs/<run name>``, so a
grid resumes the way a run does: finished runs are skipped, interrupted ones continue from their
last checkpoint. The table gives, per model, method, blocks and dataset, the mean and standard
deviation of the final test top-1 over seeds next to the memory and FLOPs; the plot is the
paper's accuracy-against-memory picture (Figures 5 and 7): marker area proportional to the
training FLOPs, the Pareto front (no other point has less memory and more accuracy) marked.

Runs are independent jobs. ``launcher="local"`` runs them one after another in this process;
``launcher="submitit"`` hands each to submitit (Slurm on a cluster, its ``local`` executor on one
machine), and a run with ``processes > 1`` is started with ``torchrun`` (DDP, one GPU a process).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .choices import BLOCK_METHODS, DEFAULT_BLOCKS, LAUNCHERS, METHODS, check_choice
from .data import require_dataset
from .train import TrainConfig, atomic_write_bytes, atomic_write_json, train_or_resume

TABLE3_METHODS = ("ft-all", "ft-last", "ft-bn", "ft-bias", "ft-blocks", "mobiletl", "tinytl-lite-residual")


@dataclass(frozen=True)
class Grid:
    """A list of runs: every model x method x dataset x seed, with shared ``settings``.

    A method is a name from ``METHODS`` or ``name:K`` for a block-wise method with K blocks;
    a block-wise method without ``:K`` is run once for each value in ``blocks``.
    ``settings`` holds any other ``TrainConfig`` fields (epochs, weights, resolution, lr ...).
    """

    models: tuple = ("mobilenet_v3_small",)
    methods: tuple = TABLE3_METHODS
    datasets: tuple = ("offline-target",)
    seeds: tuple = (0, 1, 2, 3)
    blocks: tuple = (DEFAULT_BLOCKS,)
    settings: dict = field(default_factory=dict)
    description: str = ""

    def method_blocks(self) -> list[tuple[str, int | None]]:
        pairs = []
        for spec in self.methods:
            name, _, k = str(spec).partition(":")
            if name not in METHODS:
                raise ValueError(f"unknown method {name!r} in the grid; valid choices: {', '.join(METHODS)}")
            if k:
                if not k.isdigit():
                    raise ValueError(f"method {spec!r}: the part after ':' must be a number of blocks")
                pairs.append((name, int(k)))
            else:
                pairs += [(name, b) for b in self.blocks] if name in BLOCK_METHODS else [(name, None)]
        return list(dict.fromkeys(pairs))

    def runs(self) -> list[TrainConfig]:
        unknown = set(self.settings) - {f.name for f in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}")
        return [TrainConfig(model=model, method=method, blocks=blocks, dataset=dataset, seed=seed,
                            **self.settings).resolved()
                for dataset in self.datasets for model in self.models
                for method, blocks in self.method_blocks() for seed in self.seeds]


PRESETS = {
    "offline": Grid(description="Table 3's methods on the offline default (MobileNetV3-Small from the shipped "
                                "source checkpoint, offline-target, blocks=3, four seeds): the CPU benchmark"),
    "table3": Grid(models=("proxyless_mobile",), datasets=("cifar100",), settings={"epochs": 50},
                   description="Table 3: Proxyless-Mobile, ImageNet -> CIFAR100, blocks=3, four seeds, 50 epochs. "
                               "torchvision has no Proxyless weights: pass the official proxyless_mobile.pth "
                               "with --weights. TinyTL itself patches every block (tinytl-lite-residual:20)."),
    "table4": Grid(methods=("ft-blocks", "remove-se", "relu", "mobiletl"), datasets=("cifar10",),
                   settings={"epochs": 50},
                   description="Table 4: MobileNetV3-Small IRB variants (vanilla, remove-SE, ReLU, MobileTL), "
                               "ImageNet -> CIFAR10; the paper does not state K, blocks=3 assumed"),
    "figure5": Grid(models=("proxyless_mobile",),
                    methods=("ft-blocks", "mobiletl", "ft-bias", "tinytl-lite-residual"),
                    datasets=("cifar10", "cifar100", "flowers102", "pets", "aircraft", "cars", "food101", "cub200"),
                    settings={"epochs": 50},
                    description="Figure 5: Proxyless-Mobile on the eight target datasets (pass its weights "
                                "with --weights)"),
    "figure6": Grid(methods=("ft-blocks", "mobiletl", "mobiletl-exp-bn", "mobiletl-dw-bn",
                             "mobiletl-all-bn-shift", "mobiletl-all-bn"),
                    datasets=("cifar10",), blocks=(1, 3, 5), settings={"epochs": 50},
                    description="Figure 6: which BN of a trained block trains fully (MobileNetV3-Small); the "
                                "paper names neither dataset nor K: CIFAR10 and K in {1, 3, 5} assumed"),
    "figure7": Grid(models=("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "proxyless_mobile",
                            "resnet18", "resnet50"),
                    methods=("ft-blocks", "mobiletl"), datasets=("cifar10",), settings={"epochs": 50},
                    description="Figure 7: MobileTL across architectures, blocks=3; dataset not stated in the "
                                "text, CIFAR10 assumed (proxyless_mobile needs its weights by path)"),
}


def run_dir(out: str | os.PathLike, config: TrainConfig) -> Path:
    return Path(out) / "runs" / config.run_name()


def finished_summary(directory: Path, config: TrainConfig) -> dict | None:
    """The run's summary if it finished with exactly ``config``, else None."""
    path = directory / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary["config"] == dataclasses.asdict(config) else None


def run_one(config: dict, out: str, options: dict) -> dict:
    """One grid point (module level, so that submitit can pickle it)."""
    return train_or_resume(TrainConfig(**config), out, **options)


def torchrun_command(config: TrainConfig, out: str | os.PathLike, processes: int, options: dict) -> list[str]:
    """``torchrun`` starting ``mobiletl-edu train`` for ``config`` on ``processes`` processes (DDP)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "mobiletl_edu.cli", "train", "--out", str(out), "--quiet"]
    if (Path(out) / "config.json").exists():
        command.append("--resume")
    for name, value in dataclasses.asdict(config).items():
        flag = "--" + name.replace("_", "-")
        if name == "deterministic":
            command += [] if value else ["--no-deterministic"]
        elif value is not None:
            command += [flag, str(value)]
    command += ["--data-root", str(options.get("data_root", "data"))]
    command += ["--download"] if options.get("download") else []
    command += ["--device", options["device"]] if options.get("device") else []
    return command


def run_grid(grid: Grid, out: str | os.PathLike, *, launcher: str = "local", processes: int = 1,
             executor_options: dict | None = None, data_root: str | os.PathLike = "data",
             download: bool = False, device: str | None = None, progress: bool = True,
             retry_failed: bool = False, report=None) -> list[dict]:
    """Run every unfinished point of ``grid`` under ``out`` and write the table and plot there.

    ``launcher``: ``local`` (here, one run after another) or ``submitit``; ``executor_options``
    go to ``submitit.AutoExecutor`` (``cluster``: ``local``, ``slurm`` ...) and its
    ``update_parameters`` (``timeout_min``, ``slurm_partition`` ...). ``processes`` > 1 starts
    each run with torchrun. A run that fails (diverges, runs out of memory ...) is named,
    recorded in ``<out>/failed.json`` and in the table, and the grid goes on; later calls
    leave it failed unless ``retry_failed``. ``report`` receives one line per run started and
    finished ("run i of N", time left). Returns the per-run summaries.
    """
    check_choice("launcher", launcher, LAUNCHERS)
    report = report or (lambda line: None)
    configs = grid.runs()
    out = Path(out)
    options = {"data_root": str(data_root), "download": download, "device": device, "progress": progress}
    failed = read_failures(out)
    if retry_failed:
        failed = {}
    todo = [c for c in configs if finished_summary(run_dir(out, c), c) is None and c.run_name() not in failed]
    for dataset in dict.fromkeys(c.dataset for c in todo):  # a missing dataset fails the grid, not each run
        require_dataset(dataset, data_root, download)
    skipped = sum(c.run_name() in failed for c in configs)
    if skipped:
        report(f"{skipped} run(s) failed before and are left out; --retry-failed runs them again")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if launcher == "local":
        started, total = time.monotonic(), len(todo)
        for i, config in enumerate(todo, 1):
            report(f"run {i} of {total}: {config.run_name()}" + _time_left(started, i - 1, total))
            try:
                if processes > 1:
                    subprocess.run(torchrun_command(config, run_dir(out, config), processes, options), check=True)
                    summary = finished_summary(run_dir(out, config), config)
                else:
                    summary = run_one(dataclasses.asdict(config), str(run_dir(out, config)), options)
            except Exception as error:  # noqa: BLE001 - any failure of one run is recorded, the grid goes on
                failed[config.run_name()] = _failure(config, error)
                _write_failures(out, failed)
                report(f"run {i} of {total} FAILED: {config.run_name()}: {' '.join(str(error).split())[:300]}")
                continue
            failed.pop(config.run_name(), None)
            _write_failures(out, failed)
            report(f"run {i} of {total} done: {config.run_name()}: test top-1 {summary['final']['test_top1']:.2f}%"
                   f" in {time.monotonic() - started:.0f} s so far")
    elif todo:
        _submit(todo, out, processes, dict(executor_options or {}), {**options, "progress": False}, failed, report)
        _write_failures(out, failed)
    summaries = collect(grid, out)
    write_results(results_table(summaries, failures_of(grid, out)), out)
    return summaries


def _time_left(started: float, done: int, total: int) -> str:
    if not done:
        return ""
    left = (time.monotonic() - started) / done * (total - done)
    return f" (about {left / 60:.0f} min left)" if left >= 90 else f" (about {left:.0f} s left)"


def _failure(config: TrainConfig, error: BaseException) -> dict:
    return {"config": dataclasses.asdict(config), "error": f"{type(error).__name__}: {' '.join(str(error).split())}"}


def read_failures(out: str | os.PathLike) -> dict:
    """Run name -> {config, error} of the grid's failed runs (``<out>/failed.json``)."""
    path = Path(out) / "failed.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_failures(out: Path, failed: dict) -> None:
    if failed or (out / "failed.json").exists():
        atomic_write_json(out / "failed.json", failed)


def failures_of(grid: Grid, out: str | os.PathLike) -> list[dict]:
    """The failure records of the grid's runs that failed and have not finished since."""
    failed = read_failures(out)
    return [failed[c.run_name()] for c in grid.runs()
            if c.run_name() in failed and finished_summary(run_dir(out, c), c) is None]


def _submit(configs: list[TrainConfig], out: Path, processes: int, executor_options: dict, options: dict,
            failed: dict, report):
    try:
        import submitit
    except ImportError as error:
        raise ValueError("launcher 'submitit' needs the submitit package: pip install submitit") from error
    cluster = executor_options.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=out / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(**{"timeout_min": 24 * 60, "tasks_per_node": 1, "nodes": 1,
                                  **({"gpus_per_node": processes} if processes > 1 else {}), **executor_options})
    jobs = []
    with executor.batch():
        for config in configs:
            directory = run_dir(out, config)
            if processes > 1:
                command = submitit.helpers.CommandFunction(torchrun_command(config, directory, processes, options))
                jobs.append(executor.submit(command))
            else:
                jobs.append(executor.submit(run_one, dataclasses.asdict(config), str(directory), options))
    for config, job in zip(configs, jobs):
        try:
            job.result()  # raises if the run failed, with the job's own error
        except Exception as error:  # noqa: BLE001 - recorded, the other jobs go on
            failed[config.run_name()] = _failure(config, error)
            report(f"FAILED: {config.run_name()}: {' '.join(str(error).split())[:300]}")


def collect(grid: Grid, out: str | os.PathLike) -> list[dict]:
    """The summaries of the grid's finished runs (unfinished ones are left out)."""
    found = [finished_summary(run_dir(out, c), c) for c in grid.runs()]
    return [s for s in found if s is not None]


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("dataset", "model", "method", "blocks", "seeds", "top1_mean", "top1_std",
                 "stored_activation_mb", "peak_memory_mb", "analytic_memory_mb", "training_mflops",
                 "trainable_parameters", "failed_seeds")


def results_table(summaries: list[dict], failures: list[dict] = ()) -> list[dict]:
    """One row per (dataset, model, method, blocks): top-1 mean and sample std over seeds.

    ``failures`` (from :func:`failures_of`) are listed in ``failed_seeds``; a group whose runs
    all failed has a row with no accuracy or memory.

    Measured: stored activations (``measure.saved_activations``, one batch) and peak memory
    (process peak RSS, or CUDA peak allocated), averaged over seeds. Analytic, from
    ``mobiletl_edu.profiler`` (paper convention, at the run's batch and resolution): memory
    footprint (parameters + activation peak) and training FLOPs (forward + backward).
    """
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        c = s["config"]
        groups.setdefault((c["dataset"], c["model"], c["method"], c["blocks"]), []).append(s)
    failed_seeds: dict[tuple, list[int]] = {}
    for f in failures:
        c = f["config"]
        key = (c["dataset"], c["model"], c["method"], c["blocks"])
        failed_seeds.setdefault(key, []).append(c["seed"])
        groups.setdefault(key, [])
    rows = []
    for (dataset, model, method, blocks), members in groups.items():
        seeds = " ".join(map(str, sorted(failed_seeds.get((dataset, model, method, blocks), []))))
        if not members:
            rows.append({**dict.fromkeys(TABLE_COLUMNS), "dataset": dataset, "model": model, "method": method,
                         "blocks": blocks, "seeds": 0, "failed_seeds": seeds})
            continue
        accuracies = [m["final"]["test_top1"] for m in members]
        mean, std = statistics.mean(accuracies), statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        config = members[0]["config"]
        analytic = _analytic_costs(config, members[0]["num_classes"])
        rows.append({
            "dataset": dataset, "model": model, "method": method, "blocks": blocks, "seeds": len(members),
            "top1_mean": round(mean, 3), "top1_std": round(std, 3),
            "stored_activation_mb": round(statistics.mean(m["stored_activation_bytes"] for m in members) / 1e6, 3),
            "peak_memory_mb": round(statistics.mean(m["final"]["peak_memory_bytes"] for m in members) / 1e6, 1),
            "analytic_memory_mb": analytic[0], "training_mflops": analytic[1],
            "trainable_parameters": members[0]["trainable_parameters"], "failed_seeds": seeds,
        })
    return rows


def _analytic_costs(config: dict, num_classes: int) -> tuple[float | None, float | None]:
    """(memory MB, training MFLOPs) from the profiler; (None, None) if it is not installed."""
    try:
        from .profiler import profile_model
    except ImportError:
        return None, None
    profile = profile_model(config["model"], config["method"], config["blocks"], batch=config["batch_size"],
                            resolution=config["resolution"], classes=num_classes, convention="paper",
                            frozen_precision=config["frozen_precision"])
    return round(profile.mb(profile.peak_bytes), 3), round(profile.training_flops / 1e6, 1)


def markdown_table(rows: list[dict]) -> str:
    head = ("| dataset | model | method | blocks | seeds | top-1 (%) | stored act. (MB) | peak mem. (MB) "
            "| analytic mem. (MB) | train MFLOPs | trainable params |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        failed = f" (failed: seed {r['failed_seeds']})" if r.get("failed_seeds") else ""
        top1 = "failed" if r["top1_mean"] is None else f"{r['top1_mean']:.2f} ± {r['top1_std']:.2f}{failed}"
        lines.append(f"| {r['dataset']} | {r['model']} | {r['method']} | {r['blocks'] or '-'} | {r['seeds']} "
                     f"| {top1} | {_or_dash(r['stored_activation_mb'], '.2f')} "
                     f"| {_or_dash(r['peak_memory_mb'], '.0f')} | {_or_dash(r['analytic_memory_mb'], '.2f')} "
                     f"| {_or_dash(r['training_mflops'], '.1f')} | {_or_dash(r['trainable_parameters'], ',')} |")
    return "\n".join(lines)


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(rows: list[dict], out: str | os.PathLike) -> list[str]:
    """``results.csv``, ``results.md``, ``results.json`` and (with finished runs) ``accuracy_vs_memory.png``
    in ``out``; returns the names of the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", text.getvalue().encode())
    atomic_write_bytes(out / "results.md", (markdown_table(rows) + "\n").encode())
    atomic_write_json(out / "results.json", rows)
    written = ["results.csv", "results.md", "results.json"]
    finished = [r for r in rows if r["top1_mean"] is not None]
    if finished:
        plot = io.BytesIO()
        plot_accuracy_vs_memory(finished).savefig(plot, format="png", dpi=120, bbox_inches="tight")
        atomic_write_bytes(out / "accuracy_vs_memory.png", plot.getvalue())
        written.append("accuracy_vs_memory.png")
    return written


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (memory, accuracy) points that no other point beats: none has memory <= and
    accuracy >= with one of them strictly better. Sorted by memory."""
    front = [i for i, (m, a) in enumerate(points)
             if not any(m2 <= m and a2 >= a and (m2 < m or a2 > a) for m2, a2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_accuracy_vs_memory(rows: list[dict], memory: str = "stored_activation_mb"):
    """Figures 5/7: top-1 against ``memory``, Pareto front marked (``plots.plot_accuracy_vs_memory``)."""
    from .plots import plot_accuracy_vs_memory as plot  # the one figure, drawn in plots.py

    return plot(rows, memory)
