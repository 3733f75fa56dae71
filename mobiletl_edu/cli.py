"""The ``mobiletl-edu`` command line: one subcommand per part of the package.

A subcommand is two functions: a parser-builder, registered with ``@subcommand``, that declares
its flags and names its command function with ``set_defaults(run=...)``; and that command
function, which imports the package modules it needs when it runs. This module imports no
torch, so ``--help`` answers at once; the choice lists come from ``mobiletl_edu.choices``.

A user error (a bad value, a missing file, an occupied folder) prints one line to stderr and
exits with status 2: no traceback, and nothing written.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from . import __version__
from .choices import (BLOCK_KINDS, BLOCK_METHODS, CONVENTIONS, DATASET_NAMES, DEFAULT_BLOCKS, DEFAULT_DATASET,
                      DEVICE_NAMES, EXPORT_FORMATS, LAUNCHERS, METHODS, MODEL_NAMES, OFFLINE_DATASETS, PRECISIONS,
                      PRETRAIN_OUT, TABLE6_METHODS, WEIGHT_NAMES, check_choice)

SUBCOMMANDS = []  # parser-builders, in the order --help lists them


def subcommand(build):
    """Register a parser-builder ``build(subparsers)``; it adds one subcommand."""
    SUBCOMMANDS.append(build)
    return build


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (the flag, the bad value, the valid choices)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Values: argparse types that refuse a bad value with one line naming it and the valid range
# ---------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1, 2, ...), got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {text!r}")
    return value


def _float_in(text: str, low: float, high: float, low_open: bool, high_open: bool, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    inside = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
    if not inside:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float_in(text, 0, math.inf, True, True, "a finite number > 0")


def momentum(text: str) -> float:
    return _float_in(text, 0, 1, True, False, "a number in (0, 1]")


def smoothing(text: str) -> float:
    return _float_in(text, 0, 1, False, True, "a number in [0, 1)")


# ---------------------------------------------------------------------------------------------
# Flags several subcommands share
# ---------------------------------------------------------------------------------------------
# TrainConfig fields as flags: (type, help); left out, each is None: the dataset's default.
RUN_FLAGS = {
    "--weights": (str, f"{' | '.join(WEIGHT_NAMES)} | PATH of a state_dict | a run folder (default: source "
                       f"for {DEFAULT_DATASET}, imagenet otherwise)"),
    "--epochs": (positive_int, "default 50 (paper), 3 for the offline datasets; with --resume, a larger "
                               "number continues a finished run"),
    "--seed": (non_negative_int, "default 0"),
    "--batch-size": (positive_int, "default 8"),
    "--lr": (positive_float, "default: the dataset's recipe (mobiletl_edu.data.recipe)"),
    "--resolution": (positive_int, "default 224, 64 for the offline datasets"),
    "--bn-momentum": (momentum, "override the BatchNorm momentum, in (0, 1]"),
    "--workers": (non_negative_int, "data-loader processes (default 0)"),
    "--limit": (positive_int, "use a fixed subset of this many images per split (smoke tests)"),
}


def add_run_flags(p, *flags, help_text=None) -> None:
    for flag in flags:
        kind, default_help = RUN_FLAGS[flag]
        p.add_argument(flag, type=kind, help=help_text or default_help)


def add_where_flags(p) -> None:
    """Where the data is and what runs it: these never change a run's result."""
    p.add_argument("--download", action="store_true", help="download missing data or ImageNet weights")
    p.add_argument("--data-root", default="data", help="folder holding the datasets (default ./data)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cuda when available)")
    add_threads_flag(p, "torch CPU threads (default: 1 for the offline datasets on the CPU, the run's "
                        "own count on --resume, else torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def add_threads_flag(p, help_text: str = "torch CPU threads") -> None:
    p.add_argument("--threads", type=positive_int, help=help_text)


def add_strict_data_flag(p) -> None:
    p.add_argument("--strict-data", action="store_true",
                   help="stop at an unreadable image of --dataset folder instead of skipping it with a warning")


def set_threads(threads, offline: bool = False) -> None:
    """``--threads``; left out, one thread for CPU runs on the offline datasets: their 64-px, batch-8
    steps are too small for a second thread to pay (on a busy 2-core machine we measured 32 ms a
    step with one thread and 110 to 570 ms with two spinning OpenMP threads)."""
    import torch
    if threads is None and offline and not torch.cuda.is_available():
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def dataset_help(default: str) -> str:
    return f"one of: {', '.join(DATASET_NAMES)} (default {default})"


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summary_command(args) -> int:
    from .methods import prepare, summary
    prepared = prepare(args.model, args.method, default_blocks(args.method, args.blocks), num_classes=args.classes,
                       frozen_precision=args.frozen_precision)
    print(summary(prepared.model))
    print("(counts of parameters; an int8 weight counts once per value. prepare folds each frozen BN of the "
          "frozen bottom into the conv before it, so its scale and shift count once, as that conv's bias.)")
    return 0


def default_blocks(method: str, blocks):
    """Block-wise methods fine-tune DEFAULT_BLOCKS top blocks when none are given, as ``train`` does."""
    from .choices import BLOCK_METHODS
    return DEFAULT_BLOCKS if blocks is None and method in BLOCK_METHODS else blocks


@subcommand
def summary_parser(sub) -> None:
    p = sub.add_parser("summary", help="show what prepare() makes of a model: trainable/frozen per block")
    p.add_argument("--model", default="mobilenet_v3_small", choices=MODEL_NAMES)
    p.add_argument("--method", default="mobiletl", choices=METHODS)
    p.add_argument("--blocks", type=int, default=None,
                   help=f"top blocks to fine-tune (block-wise methods; default {DEFAULT_BLOCKS})")
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--frozen-precision", default="int8", choices=PRECISIONS)
    p.set_defaults(run=summary_command)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
# Flags of `train` that are fields of train.TrainConfig; left out (None), the dataset's default.
TRAIN_CONFIG_FLAGS = ("model", "method", "blocks", "dataset", "weights", "epochs", "seed", "batch_size", "lr",
                      "label_smoothing", "resolution", "frozen_precision", "bn_momentum", "deterministic",
                      "workers", "limit", "bottom_chunk")


def train_command(args) -> int:
    import json
    from pathlib import Path

    from .train import TrainConfig, default_out, resume, resume_command, train
    run_file = Path(args.out or "") / "config.json"
    if args.resume and args.threads is None and run_file.is_file():  # the run's own count: bit for bit
        set_threads(json.loads(run_file.read_text()).get("threads"))
    else:
        set_threads(args.threads, offline=(args.dataset or DEFAULT_DATASET) in OFFLINE_DATASETS)
    given = {name: getattr(args, name) for name in TRAIN_CONFIG_FLAGS if getattr(args, name) is not None}
    where = dict(data_root=args.data_root, download=args.download, strict_data=args.strict_data,
                 device=args.device, progress=not args.quiet)
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR: the run to continue")
    config = TrainConfig(**given).resolved()
    out = Path(args.out) if args.out else default_out(config)
    try:
        result = resume(out, given, **where) if args.resume else train(config, args.out, **where)
    except KeyboardInterrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            if (out / "checkpoint.pt").is_file():
                print(f"mobiletl-edu train: interrupted; the run is in {out} (its last checkpoint ends an "
                      f"epoch). Continue it with: {resume_command(out, args.data_root)}", file=sys.stderr)
            else:
                print("mobiletl-edu train: interrupted before the first epoch ended; nothing was kept",
                      file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        config, final = result["config"], result["final"]
        print(f"{config['model']} {config['method']} on {config['dataset']}: test top-1 "
              f"{final['test_top1']:.2f}% after {result['epochs_done']} epochs, "
              f"{result['trainable_parameters']:,} trainable parameters, stored activations "
              f"{result['stored_activation_bytes'] / 1e6:.2f} MB; run in {result['out']}")
    return 0


@subcommand
def train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with one method (no flags: the offline demo)",
                       description="Fine-tune with the paper's recipe (Adam, cosine, batch 8). With no flags: "
                                   f"MobileNetV3-Small, mobiletl, {DEFAULT_BLOCKS} blocks, {DEFAULT_DATASET}, "
                                   "shipped source weights.")
    p.add_argument("--model", choices=MODEL_NAMES, help="default mobilenet_v3_small")
    p.add_argument("--method", choices=METHODS, help="default mobiletl")
    p.add_argument("--blocks", type=positive_int, help=f"top blocks to fine-tune (block-wise methods; "
                                                       f"default {DEFAULT_BLOCKS})")
    p.add_argument("--dataset", choices=DATASET_NAMES, metavar="DATASET", help=dataset_help(DEFAULT_DATASET))
    add_run_flags(p, *RUN_FLAGS)
    p.add_argument("--label-smoothing", type=smoothing, help="default: the dataset's recipe")
    p.add_argument("--frozen-precision", choices=PRECISIONS, help="default int8")
    p.add_argument("--bottom-chunk", type=positive_int, help="run the frozen bottom this many samples at a time "
                                                             "(less memory; default: the whole batch)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_const", const=False,
                   help="allow non-deterministic kernels")
    p.add_argument("--out", help="run directory (default runs/<run name>, numbered if taken)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                         "(with a larger --epochs: train it for more epochs)")
    add_where_flags(p)
    add_strict_data_flag(p)
    p.set_defaults(run=train_command)


# ---------------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------------
def pretrain_command(args) -> int:
    from .pretrain import pretrain, pretrain_config
    set_threads(args.threads, offline=True)
    given = {k: getattr(args, k) for k in ("epochs", "seed", "batch_size", "lr", "resolution", "bn_momentum",
                                           "limit") if getattr(args, k) is not None}
    record = pretrain(args.out, pretrain_config(**given), work_dir=args.work_dir, progress=not args.quiet)
    print(f"source checkpoint {args.out}: source test top-1 {record['source_test_top1']:.2f}%, "
          f"{record['bytes'] / 1e6:.1f} MB, sha256 {record['sha256']}")
    return 0


@subcommand
def pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain the offline source checkpoint (stands in for ImageNet)",
                       description="Train MobileNetV3-Small from scratch on offline-source and write its "
                                   "weights with a provenance JSON beside them.")
    p.add_argument("--out", default=PRETRAIN_OUT,
                   help="weights file to write (must not exist; default %(default)s); provenance goes to the "
                        "same name .json")
    p.add_argument("--work-dir", help="run directory (default: <out>-run); resumable")
    add_run_flags(p, "--epochs", "--seed", "--batch-size", "--lr", "--resolution", "--bn-momentum",
                  help_text="default: the recipe of the shipped checkpoint (mobiletl_edu.pretrain)")
    add_run_flags(p, "--limit")
    add_threads_flag(p, "torch CPU threads (the shipped file records its count)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=pretrain_command)


# ---------------------------------------------------------------------------------------------
# experiment
# ---------------------------------------------------------------------------------------------
def experiment_command(args) -> int:
    import dataclasses
    import shlex
    from pathlib import Path

    from .experiments import (PRESETS, collect, failures_of, markdown_table, results_table, run_grid,
                              write_results)
    from .train import check_out, resolve_device
    if args.list_presets:
        for name, grid in PRESETS.items():
            print(f"{name}: {len(grid.runs())} runs. {grid.description}")
        return 0
    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; valid choices: {', '.join(PRESETS)}")
    grid = PRESETS[args.preset]
    changes = {k: tuple(getattr(args, k)) for k in ("models", "methods", "datasets", "seeds", "blocks")
               if getattr(args, k) is not None}
    settings = {k: getattr(args, k) for k in ("epochs", "weights", "resolution", "batch_size", "lr", "limit",
                                              "workers") if getattr(args, k) is not None}
    grid = dataclasses.replace(grid, **changes, settings={**grid.settings, **settings})
    runs = grid.runs()  # every run's config is checked before anything runs or is written
    set_threads(args.threads, offline=set(grid.datasets) <= set(OFFLINE_DATASETS))
    out = Path(args.out or f"runs/experiments/{args.preset}")
    if args.table_only:
        rows = results_table(collect(grid, out), failures_of(grid, out))
        if not rows:
            print(f"nothing to tabulate or plot: none of the grid's {len(runs)} runs has finished in {out}")
            return 0
        written = write_results(rows, out)
    else:
        check_out(out, create_parents=args.out is None)
        if args.launcher == "local" and args.processes == 1:
            resolve_device(args.device)
        executor = {"cluster": args.cluster, **({"timeout_min": args.timeout_min} if args.timeout_min else {}),
                    **({"slurm_partition": args.partition} if args.partition else {})}
        try:
            run_grid(grid, out, launcher=args.launcher, processes=args.processes, executor_options=executor,
                     data_root=args.data_root, download=args.download, device=args.device,
                     progress=not args.quiet, retry_failed=args.retry_failed,
                     report=lambda line: print(line, file=sys.stderr, flush=True))
        except KeyboardInterrupt:
            summaries = collect(grid, out)
            write_results(results_table(summaries, failures_of(grid, out)), out)
            again = shlex.join(["mobiletl-edu", *(args.argv or ["experiment"])])
            print(f"mobiletl-edu experiment: interrupted; {len(summaries)} of {len(runs)} runs finished, partial "
                  f"table in {out / 'results.md'}. Resume the grid (finished runs are kept, the interrupted "
                  f"one continues from its last epoch) with: {again}", file=sys.stderr)
            return 130
        rows = results_table(collect(grid, out), failures_of(grid, out))
        written = ["results.csv", "results.md", "results.json"] + (["accuracy_vs_memory.png"] if any(
            r["top1_mean"] is not None for r in rows) else [])
    print(markdown_table(rows))
    print(f"{len(rows)} rows; {', '.join(written)} in {out}")
    failed = failures_of(grid, out)
    if failed:
        print(f"{len(failed)} run(s) failed (see {out / 'failed.json'}); rerun with --retry-failed to try them "
              f"again", file=sys.stderr)
        return 1
    return 0


@subcommand
def experiment_parser(sub) -> None:
    p = sub.add_parser("experiment", help="run a grid of runs (resumable); write the table and the plot",
                       description="models x methods x blocks x datasets x seeds; finished runs are skipped.")
    p.add_argument("--preset", default="offline", help="a preset grid (default offline; --list-presets "
                                                       "lists them)")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES)
    p.add_argument("--methods", nargs="+", help=f"method names, or name:K for K blocks; methods: "
                                                f"{', '.join(METHODS)}")
    p.add_argument("--blocks", nargs="+", type=positive_int, help="block counts for block-wise methods")
    p.add_argument("--datasets", nargs="+", choices=DATASET_NAMES, metavar="DATASET",
                   help=f"one or more of: {', '.join(DATASET_NAMES)}")
    p.add_argument("--seeds", nargs="+", type=non_negative_int)
    add_run_flags(p, "--epochs", "--weights", "--resolution", "--batch-size", "--lr", "--limit", "--workers")
    p.add_argument("--out", help="grid directory (default runs/experiments/<preset>)")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS)
    p.add_argument("--cluster", default=None, help="submitit cluster: slurm, local or debug (default: auto)")
    p.add_argument("--timeout-min", type=positive_int, help="submitit job time limit")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--processes", type=positive_int, default=1,
                   help="processes (GPUs) per run, started with torchrun")
    p.add_argument("--table-only", action="store_true", help="only collect finished runs into the table and plot")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before "
                                                               "(left out otherwise)")
    add_where_flags(p)
    p.set_defaults(run=experiment_command)


# ---------------------------------------------------------------------------------------------
# evaluate, predict, export: use what a run fine-tuned
# ---------------------------------------------------------------------------------------------
def evaluate_command(args) -> int:
    import json
    from pathlib import Path

    from .export import evaluate_run, plot_confusion
    from .train import atomic_write_json, check_out, run_checkpoint_path
    set_threads(args.threads)
    run = run_checkpoint_path(args.run_path)
    out = Path(args.out) if args.out else None
    if out is not None:
        check_out(out)
        if out.exists():
            raise FileExistsError(f"{out} already exists; choose another --out (nothing was overwritten)")
    result = evaluate_run(args.run_path, args.dataset, data_root=args.data_root, download=args.download,
                          strict_data=args.strict_data, device=args.device)
    if out is None:
        out = _numbered(run.parent / f"evaluation-{result['dataset']}")
    out.mkdir()
    atomic_write_json(out / "evaluation.json", result)
    figure = plot_confusion(result)
    figure.savefig(out / ".confusion_matrix.png.tmp", format="png", dpi=120, bbox_inches="tight")
    os.replace(out / ".confusion_matrix.png.tmp", out / "confusion_matrix.png")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['dataset']}: top-1 {result['top1']:.2f}%, loss {result['loss']:.4f} on {result['images']} "
          f"test images")
    width = max(len(c) for c in result["classes"])
    for name, top1 in result["per_class_top1"].items():
        print(f"  {name:<{width}}  " + ("no images" if top1 is None else f"{top1:6.2f}%"))
    print(f"evaluation.json and confusion_matrix.png in {out}")
    return 0


def _numbered(base):
    """``base``, or ``base-2``, ``base-3`` ... when taken."""
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


@subcommand
def evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="top-1, loss, per-class accuracy and a confusion-matrix plot of a run",
                       description="Evaluate a run's fine-tuned model on the test split of its dataset (or "
                                   "--dataset); write evaluation.json and confusion_matrix.png.")
    p.add_argument("run_path", metavar="RUN", help="run folder (or its checkpoint.pt)")
    p.add_argument("--dataset", choices=DATASET_NAMES, metavar="DATASET", help=dataset_help("the run's"))
    p.add_argument("--data-root", default="data", help="folder holding the datasets (default ./data)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    add_strict_data_flag(p)
    p.add_argument("--out", help="folder for the results (must not exist; default RUN/evaluation-<dataset>)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cuda when available)")
    add_threads_flag(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=evaluate_command)


def predict_command(args) -> int:
    import json

    from .export import predict
    set_threads(args.threads)
    results = predict(args.run_path, args.images, top=args.top, device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        guesses = ", ".join(f"{g['class']} {100 * g['probability']:.1f}%" for g in result["top"])
        print(f"{result['file']}: {guesses}")
    return 0


@subcommand
def predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="the most likely classes of images, by name, with a run's model")
    p.add_argument("run_path", metavar="RUN", help="run folder (or its checkpoint.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--top", type=positive_int, default=5, help="how many classes to show per image (default 5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default cuda when available)")
    add_threads_flag(p)
    p.set_defaults(run=predict_command)


def export_command(args) -> int:
    from .export import export_run
    set_threads(args.threads)
    path = export_run(args.run_path, args.format, args.out)
    print(f"{args.format} model written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


@subcommand
def export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as a plain network: TorchScript, ONNX or a state dict",
                       description="The exported network is made of ordinary layers (exact activations, "
                                   "BatchNorm2d, float Conv2d/Linear) and gives the run's eval-mode logits.")
    p.add_argument("run_path", metavar="RUN", help="run folder (or its checkpoint.pt)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", help="file to write (must not exist; default: model.<format> in the run folder)")
    add_threads_flag(p)
    p.set_defaults(run=export_command)


# ---------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------
def profile_command(args) -> int:
    import json

    import torch

    from .measure import measured_report
    from .methods import check_bottom_chunk
    from .profiler import model_training_peak, parse_size, profile_block, profile_model
    set_threads(args.threads)
    budget = None if args.fit_budget is None else parse_size(args.fit_budget, "--fit-budget")
    common = dict(convention=args.convention, frozen_precision=args.frozen_precision)
    if args.block is not None:
        if args.model is not None:
            raise ValueError("give --model (model mode) or --block (block mode), not both")
        if budget is not None or args.bottom_chunk is not None:
            raise ValueError("--fit-budget and --bottom-chunk need model mode (--model), not --block")
        shape = _input_shape(args.input_shape)
        result = profile_block(args.block, args.method, shape, expansion=args.expansion, kernel=args.kernel, **common)
        spec = dict(block=args.block, method=args.method, input_shape=list(shape), expansion=args.expansion,
                    kernel=args.kernel, frozen_precision=args.frozen_precision)
        described, peak = {**spec, "convention": args.convention}, result.training
    else:
        model = args.model or "mobilenet_v3_small"
        blocks = default_blocks(args.method, args.blocks)
        if args.bottom_chunk is not None:
            check_bottom_chunk(args.bottom_chunk, args.method)
        as_paper = args.convention != "pytorch"  # the paper's network keeps the frozen BNs
        result = profile_model(model, args.method, blocks, batch=args.batch, resolution=args.resolution,
                               classes=args.classes, optimize_bottom=not as_paper, bottom_chunk=args.bottom_chunk,
                               **common)
        peak = result.training if not as_paper else model_training_peak(
            model, args.method, blocks, batch=args.batch, resolution=args.resolution, classes=args.classes,
            frozen_precision=args.frozen_precision, bottom_chunk=args.bottom_chunk)
        spec = dict(model=model, method=args.method, blocks=blocks, batch=args.batch, resolution=args.resolution,
                    classes=args.classes, frozen_precision=args.frozen_precision, bottom_chunk=args.bottom_chunk)
        network = ("as the paper counts it: the frozen bottom keeps its BNs" if as_paper else
                   "as prepare runs it: the frozen bottom's BNs folded into its convs")
        described = {**spec, "convention": args.convention, "network": network}
    fit = _fit(spec, budget) if budget is not None else {}
    measured = measured_report(spec, args.device, torch.get_num_threads()) if args.measure else {}
    if args.json:
        report = {**described, **result.to_dict(), **fit, **measured}
        if peak is not None and "training_peak_bytes" not in report:
            report.update(training_peak_bytes=peak.bytes, training_peak_phase=peak.phase,
                          training_peak_layer=peak.layer, training_state_bytes=peak.state_bytes,
                          training_step_bytes=peak.step_bytes)
        print(json.dumps(report, indent=2))
        return 0
    print(result.table())
    mb = result.convention.bytes_per_mb
    if "network" in described:
        print(f"network         {described['network']}")
    if peak is not None and result.training is None:
        print(f"training peak   {peak.bytes / mb:.3f} MB of tensors alive at once, PyTorch's real allocations "
              f"(BNs folded): {peak.state_bytes / mb:.3f} when the step begins + {peak.step_bytes / mb:.3f} "
              f"added, in the {peak.phase} at {peak.layer}")
    if fit:
        print(f"what fits       the largest batch at {args.resolution}x{args.resolution} whose training peak "
              f"fits in {budget / mb:,.0f} MB of tensors: {fit['largest_batch']}"
              + (f" (its peak {fit['largest_batch_peak_bytes'] / mb:.1f} MB)" if fit["largest_batch"] else
                 f" (one sample needs {fit['one_sample_peak_bytes'] / mb:.1f} MB)"))
    if measured:
        _print_measured(measured, peak, result.activation_bytes, mb)
    return 0


def _fit(spec: dict, budget: int) -> dict:
    from .profiler import largest_batch, model_training_peak
    options = dict(resolution=spec["resolution"], classes=spec["classes"], frozen_precision=spec["frozen_precision"],
                   bottom_chunk=spec["bottom_chunk"])
    largest = largest_batch(spec["model"], spec["method"], spec["blocks"], budget, **options)
    at = model_training_peak(spec["model"], spec["method"], spec["blocks"], batch=max(largest, 1), **options).bytes
    if not largest:  # not even one sample fits: say what one needs
        return {"fit_budget_bytes": budget, "largest_batch": 0, "largest_batch_peak_bytes": None,
                "one_sample_peak_bytes": at}
    return {"fit_budget_bytes": budget, "largest_batch": largest, "largest_batch_peak_bytes": at}


def _print_measured(measured: dict, peak, stored: int, mb: int) -> None:
    def size(key):
        value = measured[key]
        return "n/a" if value is None else f"{value / mb:.3f} MB"

    print("measured, one warm step in a fresh process (MB = 1,000,000 bytes):")
    analytic = "" if peak is None else (f"  (analytic {peak.bytes / mb:.3f} MB, "
                                        f"{100 * (peak.bytes / measured['measured_tensor_peak_bytes'] - 1):+.1f} %)")
    print(f"  tensors, the allocator's view   peak {size('measured_tensor_peak_bytes')} = "
          f"{size('measured_state_bytes')} when the step began + {size('measured_tensor_step_peak_bytes')} "
          f"added{analytic}")
    print(f"  process, resident memory        +{size('measured_process_growth_bytes')} after the warm-up steps; "
          f"high-water mark of a warm step +{size('measured_process_step_hwm_bytes')}")
    print(f"  stored activations (hooks)      {size('measured_activation_bytes')}  (analytic {stored / mb:.3f} MB)")
    print(f"  cold first step, resident       +{size('measured_cold_step_rss_bytes')}  (one-time costs included: "
          f"not the method's memory)")


def _input_shape(text: str) -> tuple:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"--input-shape must be four positive integers N,C,H,W, got {text!r}")
    return shape


@subcommand
def profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="analytic FLOPs, parameters and training memory of a model or one block",
                       description="Model mode (default): --model/--method/--blocks. Block mode (Table 1, "
                                   "Figure 1): --block with --input-shape/--expansion/--kernel. Sizes print in "
                                   "MB of 1,000,000 bytes; JSON fields named *_bytes hold bytes.")
    p.add_argument("--model", choices=MODEL_NAMES, help="default mobilenet_v3_small (model mode)")
    p.add_argument("--method", default="mobiletl", choices=METHODS)
    p.add_argument("--blocks", type=int, default=None,
                   help=f"top blocks to fine-tune (block-wise methods; default {DEFAULT_BLOCKS})")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--resolution", type=positive_int, default=224)
    p.add_argument("--classes", type=positive_int, default=10)
    p.add_argument("--block", choices=BLOCK_KINDS, help="profile one block instead of a model")
    p.add_argument("--input-shape", default="8,96,7,7", help="block mode: N,C,H,W (default 8,96,7,7, Table 1)")
    p.add_argument("--expansion", type=positive_int, default=1,
                   help="block mode: expansion ratio (Table 1: 1, Figure 1: 6)")
    p.add_argument("--kernel", type=positive_int, default=5, help="block mode: depthwise / conv kernel size")
    p.add_argument("--convention", default="pytorch", choices=tuple(CONVENTIONS),
                   help="how bytes are counted: pytorch (what a step allocates; the network as prepare runs "
                        "it) or the paper's (the network as the paper counts it)")
    p.add_argument("--frozen-precision", default="int8", choices=PRECISIONS)
    p.add_argument("--bottom-chunk", type=positive_int,
                   help="model mode: run the frozen bottom this many samples at a time")
    p.add_argument("--fit-budget", metavar="SIZE",
                   help="model mode: the largest batch whose training peak fits in SIZE of tensors "
                        "(e.g. 512MB, 1GB, 300MiB)")
    p.add_argument("--measure", action="store_true",
                   help="add measured views of a warm step (tensors, process, stored activations) from a "
                        "fresh process")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where --measure runs the step")
    add_threads_flag(p, "torch CPU threads: the kernels they choose (training peak) and the measured step's")
    p.add_argument("--json", action="store_true", help="print a JSON report instead of the table")
    p.set_defaults(run=profile_command)


# ---------------------------------------------------------------------------------------------
# deploy, bench, import-bundle: training on the device (mobiletl_edu.deploy)
# ---------------------------------------------------------------------------------------------
def _class_names(text):
    """``--class-names``: a file with one name a line, or names separated by commas."""
    from pathlib import Path
    if text is None:
        return None
    path = Path(text)
    names = path.read_text().split("\n") if path.is_file() else text.split(",")
    return [n.strip() for n in names if n.strip()]


def deploy_command(args) -> int:
    from .deploy.bundle import write_bundle
    from .deploy.devices import get_device
    set_threads(args.threads)
    blocks = args.blocks if args.blocks is not None or args.method not in BLOCK_METHODS else DEFAULT_BLOCKS
    manifest = write_bundle(args.out, model=args.model, method=args.method, blocks=blocks, device=args.device,
                            classes=args.classes, weights=args.weights, class_names=_class_names(args.class_names),
                            batch=args.batch, resolution=args.resolution, lr=args.lr,
                            label_smoothing=args.label_smoothing, epochs=args.epochs, memory_gb=args.memory_gb,
                            budget_mb=args.budget_mb, force=args.force, download=args.download, seed=args.seed)
    estimate, profile = manifest["estimate"], get_device(args.device)
    mib = 2**20
    print(f"bundle {args.out}: {manifest['model']} {manifest['method']}"
          f"{f' ({blocks} blocks)' if manifest['blocks'] else ''}, {manifest['classes']} classes, for the "
          f"{profile.title}")
    print(f"training peak (analytic) {estimate['training_peak_bytes'] / mib:.0f} MiB of a "
          f"{estimate['budget_bytes'] / mib:.0f} MiB budget" + (" (over budget: --force)" if estimate["forced"] else ""))
    print(f"next: copy the folder to the device and run `python3 run.py --check` there (see {args.out}/README.md)")
    return 0


@subcommand
def deploy_parser(sub) -> None:
    p = sub.add_parser("deploy", help="write a training bundle for a Raspberry Pi 4 or a Jetson Nano",
                       description="Prepare a model, check its training peak against the device's memory, and "
                                   "write a self-contained folder that run.py trains on the device (Python 3.6 + "
                                   "torch 1.10 and later, nothing else).")
    p.add_argument("--model", default="mobilenet_v3_small", choices=MODEL_NAMES)
    p.add_argument("--method", default="mobiletl", choices=METHODS)
    p.add_argument("--blocks", type=positive_int, help=f"top blocks to fine-tune (block-wise methods; default "
                                                       f"{DEFAULT_BLOCKS})")
    p.add_argument("--device", required=True, choices=DEVICE_NAMES)
    p.add_argument("--classes", type=positive_int, required=True, help="classes of the device's task")
    p.add_argument("--class-names", help="names, comma-separated, or a file with one name a line")
    p.add_argument("--out", required=True, help="the bundle folder to create (must not exist or be empty)")
    p.add_argument("--weights", default="imagenet", help=f"{' | '.join(WEIGHT_NAMES)} | PATH of a state_dict "
                                                         f"(default imagenet)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--resolution", type=positive_int, default=224)
    p.add_argument("--lr", type=positive_float, default=3e-4, help="Adam's learning rate on the device")
    p.add_argument("--label-smoothing", type=smoothing, default=0.1)
    p.add_argument("--epochs", type=positive_int, default=10, help="the device's default (run.py --epochs)")
    p.add_argument("--memory-gb", type=positive_int, help="the device's memory (default: Table 6's, 4 GB)")
    p.add_argument("--budget-mb", type=positive_int, help="override the memory a training run may use")
    p.add_argument("--force", action="store_true", help="write the bundle even if the peak exceeds the budget")
    p.add_argument("--download", action="store_true", help="download missing ImageNet weights")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the new classifier")
    add_threads_flag(p)
    p.set_defaults(run=deploy_command)


def _methods(text: str) -> list:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods or [text]:
        check_choice("method", method, METHODS)
    return methods


def bench_command(args) -> int:
    import json

    from .deploy import bench, latency
    methods = _methods(args.methods)
    calibration = json.loads(open(args.calibration).read()) if args.calibration else None
    report = bench.bench(args.model, methods, args.blocks, steps=args.steps, warmup=args.warmup, batch=args.batch,
                         resolution=args.resolution, classes=args.classes, threads=args.threads, device=args.device)
    if args.predict or calibration:
        devices = {"calibrated": calibration} if calibration else {d: None for d in ("pi4", "nano")}
        report["predicted_s"] = {}
        for method in methods:
            phases = latency.method_phases(args.model, method, args.blocks, batch=args.batch,
                                           resolution=args.resolution, classes=args.classes)
            label = bench.method_label(method, args.blocks if method in bench.BLOCK_METHODS else None)
            report["predicted_s"][label] = {name: latency.predict(phases, latency.device_constants(name, c))
                                            for name, c in devices.items()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}, batch {report['batch']}, {report['resolution']}x{report['resolution']}, "
          f"{report['classes']} classes, {report['steps']} steps after {report['warmup']} warm-up, methods "
          f"interleaved; {report['device']}, {report['threads']} threads, torch {report['torch']}")
    print(bench.bench_table(report))
    for label, predictions in report.get("predicted_s", {}).items():
        print(f"latency model, {label}: " + ", ".join(f"{d} {s:.3f} s" for d, s in predictions.items()))
    return 0


@subcommand
def bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="training-step latency per method, the paper's Table 6 protocol",
                       description="Batch 8, 224x224, 10 classes, random data: warm-up, then --steps steps per "
                                   "method, the methods interleaved; mean, median, spread and ratio to the first.")
    p.add_argument("--model", default="mobilenet_v3_small", choices=MODEL_NAMES)
    p.add_argument("--methods", default=",".join(TABLE6_METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--blocks", type=positive_int, default=DEFAULT_BLOCKS, help="for the block-wise methods")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--warmup", type=non_negative_int, default=5)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--resolution", type=positive_int, default=224)
    p.add_argument("--classes", type=positive_int, default=10)
    add_threads_flag(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (synchronized around every step)")
    p.add_argument("--predict", action="store_true",
                   help="add the latency model's prediction for the Pi 4 and the Jetson Nano")
    p.add_argument("--calibration", help="predict for a device calibrated with run.py --calibrate --json > FILE")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=bench_command)


def import_bundle_command(args) -> int:
    from .deploy.bundle import import_bundle
    out = import_bundle(args.bundle, args.out, args.checkpoint)
    print(f"run folder {out}: the bundle's network with the device's training; evaluate or export it from there")
    return 0


@subcommand
def import_bundle_parser(sub) -> None:
    p = sub.add_parser("import-bundle", help="bring a bundle trained on the device back as a run folder",
                       description="Verify the bundle, read the checkpoint run.py wrote (BUNDLE/training/ unless "
                                   "--checkpoint), and write a run folder that evaluate and export accept.")
    p.add_argument("bundle", help="the bundle folder")
    p.add_argument("--out", help="run folder to create (default runs/<bundle name>-imported)")
    p.add_argument("--checkpoint", help="run.py's checkpoint.safetensors, if not in BUNDLE/training/")
    p.set_defaults(run=import_bundle_command)


# ---------------------------------------------------------------------------------------------
# The parser and the entry point
# ---------------------------------------------------------------------------------------------
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
               IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mobiletl-edu", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for build in SUBCOMMANDS:
        build(sub)
    return parser


def one_line(error: BaseException) -> str:
    """The error's message on one line (a user error is never a traceback)."""
    return " ".join(str(error).split()) or type(error).__name__


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"mobiletl-edu: warning: {message}\n"


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a usage error already printed
        return done.code
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a command that continues the work
    import warnings
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.run(args)
    except USER_ERRORS as error:
        print(f"mobiletl-edu {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"mobiletl-edu {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous  # main() called from Python leaves the caller's as it was


if __name__ == "__main__":
    sys.exit(main())
