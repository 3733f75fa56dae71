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
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .choices import BLOCK_METHODS, DEFAULT_BLOCKS, LAUNCHERS, METHODS, check_choice
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
             download: bool = False, device: str | None = None, progress: bool = True) -> list[dict]:
    """Run every unfinished point of ``grid`` under ``out`` and write the table and plot there.

    ``launcher``: ``local`` (here, one run after another) or ``submitit``; ``executor_options``
    go to ``submitit.AutoExecutor`` (``cluster``: ``local``, ``slurm`` ...) and its
    ``update_parameters`` (``timeout_min``, ``slurm_partition`` ...). ``processes`` > 1 starts
    each run with torchrun. Returns the per-run summaries.
    """
    check_choice("launcher", launcher, LAUNCHERS)
    configs = grid.runs()
    out = Path(out)
    options = {"data_root": str(data_root), "download": download, "device": device, "progress": progress}
    todo = [c for c in configs if finished_summary(run_dir(out, c), c) is None]
    if launcher == "local":
        for config in todo:
            if processes > 1:
                import subprocess
                subprocess.run(torchrun_command(config, run_dir(out, config), processes, options), check=True)
            else:
                run_one(dataclasses.asdict(config), str(run_dir(out, config)), options)
    elif todo:
        _submit(todo, out, processes, dict(executor_options or {}), {**options, "progress": False})
    summaries = collect(grid, out)
    write_results(results_table(summaries), out)
    return summaries


def _submit(configs: list[TrainConfig], out: Path, processes: int, executor_options: dict, options: dict):
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
    for job in jobs:
        job.result()  # raises if a run failed, with the job's own error


def collect(grid: Grid, out: str | os.PathLike) -> list[dict]:
    """The summaries of the grid's finished runs (unfinished ones are left out)."""
    found = [finished_summary(run_dir(out, c), c) for c in grid.runs()]
    return [s for s in found if s is not None]


# ---------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------
TABLE_COLUMNS = ("dataset", "model", "method", "blocks", "seeds", "top1_mean", "top1_std",
                 "stored_activation_mb", "peak_memory_mb", "analytic_memory_mb", "training_mflops",
                 "trainable_parameters")


def results_table(summaries: list[dict]) -> list[dict]:
    """One row per (dataset, model, method, blocks): top-1 mean and sample std over seeds.

    Measured: stored activations (``measure.saved_activations``, one batch) and peak memory
    (process peak RSS, or CUDA peak allocated), averaged over seeds. Analytic, from
    ``mobiletl_edu.profiler`` (paper convention, at the run's batch and resolution): memory
    footprint (parameters + activation peak) and training FLOPs (forward + backward).
    """
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        c = s["config"]
        groups.setdefault((c["dataset"], c["model"], c["method"], c["blocks"]), []).append(s)
    rows = []
    for (dataset, model, method, blocks), members in groups.items():
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
            "trainable_parameters": members[0]["trainable_parameters"],
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
        lines.append(f"| {r['dataset']} | {r['model']} | {r['method']} | {r['blocks'] or '-'} | {r['seeds']} "
                     f"| {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['stored_activation_mb']:.2f} "
                     f"| {r['peak_memory_mb']:.0f} | {_or_dash(r['analytic_memory_mb'], '.2f')} "
                     f"| {_or_dash(r['training_mflops'], '.1f')} | {r['trainable_parameters']:,} |")
    return "\n".join(lines)


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_results(rows: list[dict], out: str | os.PathLike) -> None:
    """``results.csv``, ``results.md``, ``results.json`` and ``accuracy_vs_memory.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "results.csv", text.getvalue().encode())
    atomic_write_bytes(out / "results.md", (markdown_table(rows) + "\n").encode())
    atomic_write_json(out / "results.json", rows)
    if rows:
        plot_accuracy_vs_memory(rows).savefig(out / "accuracy_vs_memory.png", dpi=120, bbox_inches="tight")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (memory, accuracy) points that no other point beats: none has memory <= and
    accuracy >= with one of them strictly better. Sorted by memory."""
    front = [i for i, (m, a) in enumerate(points)
             if not any(m2 <= m and a2 >= a and (m2 < m or a2 > a) for m2, a2 in points)]
    return sorted(front, key=lambda i: points[i])


def plot_accuracy_vs_memory(rows: list[dict], memory: str = "stored_activation_mb"):
    """Figures 5/7: top-1 against ``memory``, marker area ~ training FLOPs, Pareto front marked.

    One panel per dataset. Without FLOPs (no profiler) every marker has the same size.
    """
    from matplotlib.figure import Figure  # no pyplot: no global figure state, any backend

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig = Figure(figsize=(6.5 * len(datasets), 4.8))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    flops = [r["training_mflops"] for r in rows if r["training_mflops"]]
    largest = max(flops) if flops else None
    several_models = len({r["model"] for r in rows}) > 1
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in rows if r["dataset"] == dataset]
        points = [(r[memory], r["top1_mean"]) for r in mine]
        sizes = [60 + 900 * r["training_mflops"] / largest if largest and r["training_mflops"] else 120 for r in mine]
        front = pareto_front(points)
        by_memory = sorted(range(len(points)), key=lambda i: points[i])
        below = {i for rank, i in enumerate(by_memory) if rank % 2}  # neighbours' labels alternate sides
        for i, (r, (m, a)) in enumerate(zip(mine, points)):
            ax.errorbar(m, a, yerr=r["top1_std"], fmt="none", ecolor="0.5", capsize=3, zorder=1)
            ax.scatter(m, a, s=sizes[i], alpha=0.55, zorder=2,
                       edgecolors="black" if i in front else "none", linewidths=1.5)
            label = r["method"] + (f"-{r['blocks']}blk" if r["blocks"] else "")
            ax.annotate(f"{r['model']} {label}" if several_models else label, (m, a),
                        textcoords="offset points", xytext=(6, -14 if i in below else 6), fontsize=8)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1,
                label="Pareto front", zorder=0)
        ax.set_xlabel({"stored_activation_mb": "stored activations, measured (MB)",
                       "analytic_memory_mb": "memory footprint, analytic (MB)",
                       "peak_memory_mb": "peak memory, measured (MB)"}.get(memory, memory))
        ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
        ax.set_title(f"{dataset}: marker area ~ training FLOPs" if largest
                     else f"{dataset} (no FLOPs: profiler missing)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
