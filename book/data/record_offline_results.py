"""Chapter 7's recorded runs: run them once, write the results table and a record of how.

    python book/data/record_offline_results.py [--out runs/experiments/offline-ch7]

Runs, one after the other, with one torch thread each (run it under ``nice`` on a shared
machine; grids resume, so an interrupted recording continues where it stopped):

1. MobileNetV3-Small from the shipped source checkpoint on ``offline-target``, ``blocks=3``,
   four seeds: Table 3's methods, Figure 6's BatchNorm variants, Table 4's IRB variants and
   Table 5's MobileTL with lite-residual patches;
2. offline source checkpoints for Proxyless-Mobile and MobileNetV2, made as the shipped one
   was (``ft-all`` from random weights on ``offline-source``, the same recipe);
3. Figure 5's methods on Proxyless-Mobile and Figure 7's two methods on MobileNetV2, two seeds.

Then it writes ``offline_results.csv`` (the results table, one row per model and method) and
``offline_results.json`` (the commands, per-seed accuracies, times, machine, software, the
sha256 of the package sources and of every source checkpoint) beside this file.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TABLE3 = ("ft-all", "ft-last", "ft-bn", "ft-bias", "ft-blocks", "mobiletl", "tinytl-lite-residual")
ABLATIONS = ("mobiletl-exp-bn", "mobiletl-dw-bn", "mobiletl-all-bn-shift", "mobiletl-all-bn",
             "remove-se", "relu", "mobiletl+tinytl-lite-residual")
SEEDS, OTHER_SEEDS = (0, 1, 2, 3), (0, 1)
# Figure 5's four methods, and mobiletl-all-bn: MobileTL with every BatchNorm trained fully,
# to tell which half of MobileTL costs Proxyless-Mobile its accuracy offline.
FIGURE5 = ("proxyless_mobile", ("ft-blocks", "mobiletl", "ft-bias", "tinytl-lite-residual",
                                "mobiletl-all-bn"))
FIGURE7 = ("mobilenet_v2", ("ft-blocks", "mobiletl"))
# The recipe of the shipped source checkpoint (mobiletl_edu/assets/*.json records it).
SOURCE_RECIPE = "--epochs 30 --batch-size 32 --lr 0.002 --resolution 64 --bn-momentum 0.1 --seed 0"


def commands(out: str) -> list[tuple[str, str]]:
    """(what, command) in the order they run; ``out`` is the grid folder."""
    every = " ".join(TABLE3 + ABLATIONS)
    steps = [("MobileNetV3-Small: Tables 3, 4, 5 and Figure 6",
              f"mobiletl-edu experiment --preset offline --methods {every} "
              f"--seeds {' '.join(map(str, SEEDS))} --threads 1 --quiet --out {out}")]
    for model in (FIGURE5[0], FIGURE7[0]):
        steps.append((f"offline source checkpoint for {model}",
                      f"mobiletl-edu train --model {model} --method ft-all --dataset offline-source "
                      f"--weights none {SOURCE_RECIPE} --threads 1 --quiet --out {out}/sources/{model}"))
    for figure, (model, methods) in (("Figure 5", FIGURE5), ("Figure 7", FIGURE7)):
        steps.append((f"{figure}: {model}",
                      f"mobiletl-edu experiment --preset offline --models {model} "
                      f"--methods {' '.join(methods)} --weights {out}/sources/{model} "
                      f"--seeds {' '.join(map(str, OTHER_SEEDS))} --threads 1 --quiet --out {out}"))
    return steps


def grids(out: str):
    """The grids the commands ran, to collect their finished runs."""
    from mobiletl_edu.experiments import PRESETS, Grid

    base = PRESETS["offline"]
    yield Grid(methods=TABLE3 + ABLATIONS, seeds=SEEDS, settings=dict(base.settings))
    for model, methods in (FIGURE5, FIGURE7):
        yield Grid(models=(model,), methods=methods, seeds=OTHER_SEEDS,
                   settings={**base.settings, "weights": f"{out}/sources/{model}"})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    return {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "arch": platform.machine(),
            "description": f"a {os.cpu_count()}-core {cpu} machine ({platform.machine()}, CPU only)"}


def run(command: str) -> None:
    """One command of :func:`commands`, in a fresh process; a finished training run is skipped
    and an interrupted one resumed (grids skip finished runs by themselves)."""
    words = shlex.split(command)
    if words[1] == "train":
        out = Path(words[words.index("--out") + 1])
        if (out / "summary.json").is_file():
            return
        if (out / "checkpoint.pt").is_file():
            words += ["--resume"]
    subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", *words[1:]], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/experiments/offline-ch7")
    args = parser.parse_args()
    os.chdir(REPO)
    Path(args.out, "sources").mkdir(parents=True, exist_ok=True)  # the CLI wants existing parents
    started_utc, started = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    # An interrupted recording resumes in a new invocation; the ledger keeps every
    # invocation's start and wall time (up to its last finished step) for the record.
    ledger_path = Path(args.out, "recording_invocations.json")
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else []
    ledger.append({"started": started_utc.isoformat(timespec="seconds"), "seconds": 0})
    timings = []
    for what, command in commands(args.out):
        t0 = time.perf_counter()
        print(f"== {what}\n   {command}", flush=True)
        run(command)
        timings.append({"what": what, "seconds": round(time.perf_counter() - t0, 1)})
        ledger[-1]["seconds"] = round(time.perf_counter() - started)
        ledger_path.write_text(json.dumps(ledger, indent=1) + "\n")

    import torch
    import torchvision

    from mobiletl_edu.experiments import TABLE_COLUMNS, collect, results_table
    from mobiletl_edu.train import SOURCE_CHECKPOINT

    summaries = [s for grid in grids(args.out) for s in collect(grid, args.out)]
    rows = results_table(summaries)
    expected = sum(len(g.runs()) for g in grids(args.out))
    if len(summaries) != expected:
        raise SystemExit(f"only {len(summaries)} of {expected} runs finished; run the script again")
    with open(HERE / "offline_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    per_seed: dict = {}
    for s in summaries:
        c = s["config"]
        key = f"{c['model']}/{c['method']}" + (f":{c['blocks']}" if c["blocks"] else "")
        per_seed.setdefault(key, {})[str(c["seed"])] = round(s["final"]["test_top1"], 3)
    package = REPO / "mobiletl_edu"
    git_head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "what": "Chapter 7's recorded runs, made by book/data/record_offline_results.py; "
                "offline_results.csv is the results table of all of them (experiments.results_table).",
        "commands": [c for _, c in commands(args.out)],
        "seeds": {"mobilenet_v3_small": list(SEEDS), "other models": list(OTHER_SEEDS)},
        "per_seed_test_top1": dict(sorted(per_seed.items())),
        "date_utc": {"started": ledger[0]["started"],
                     "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "wall_seconds": sum(i["seconds"] for i in ledger[:-1]) + round(time.perf_counter() - started),
        "invocations": ledger,
        "step_seconds": timings,  # this invocation's
        "invocation": " ".join([Path(sys.executable).name, *sys.argv]),
        "threads": 1,
        "niceness": os.nice(0),
        "machine": machine(),
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
        "git_head": git_head,
        "package_sources_sha256": {p.name: sha256(p) for p in sorted(package.glob("*.py"))},
        "source_checkpoints_sha256": {
            "mobilenet_v3_small (shipped)": sha256(SOURCE_CHECKPOINT),
            **{model: sha256(Path(args.out, "sources", model, "checkpoint.pt"))
               for model in (FIGURE5[0], FIGURE7[0]) if Path(args.out, "sources", model, "checkpoint.pt").is_file()}},
        "source_test_top1": {model: round(json.loads(Path(args.out, "sources", model, "summary.json").read_text())
                                          ["final"]["test_top1"], 3) for model in (FIGURE5[0], FIGURE7[0])},
    }
    (HERE / "offline_results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {HERE / 'offline_results.csv'} and offline_results.json ({len(summaries)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
