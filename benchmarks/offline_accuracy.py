"""Offline benchmark: Table 3's methods on the offline default, four seeds, and the demo's time.

Issue 4's targets, on MobileNetV3-Small fine-tuned from the shipped source checkpoint on
``offline-target`` with ``blocks=3``:

* ``mobiletl`` within 2 top-1 points of ``ft-blocks``, and both above ``ft-last``;
* one ``mobiletl-edu train`` with no flags (the README quick start) in under 2 minutes.

The grid is the ``offline`` preset of :mod:`mobiletl_edu.experiments`; it resumes (finished runs
are skipped), so an interrupted benchmark continues where it stopped. Results go to
``--out`` (table, plot, ``benchmark.json``). Exit status 1 when a target is missed.

    python benchmarks/offline_accuracy.py [--out runs/benchmarks/offline] [--threads N] [--skip-demo]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobiletl_edu.experiments import PRESETS, collect, markdown_table, results_table, run_grid

DEMO_LIMIT_S = 120.0
MOBILETL_GAP = 2.0  # points


def time_demo(threads: int | None) -> float:
    """Wall time of ``mobiletl-edu train`` with no flags, in a fresh process and an empty folder."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", "train"], cwd=folder, env=env, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return time.perf_counter() - started


def check_targets(rows: list[dict]) -> dict:
    by_method = {r["method"]: r for r in rows}
    mobiletl, blocks, last = (by_method[m]["top1_mean"] for m in ("mobiletl", "ft-blocks", "ft-last"))
    return {"mobiletl_within_2_of_ft_blocks": abs(mobiletl - blocks) <= MOBILETL_GAP,
            "mobiletl_above_ft_last": mobiletl > last, "ft_blocks_above_ft_last": blocks > last,
            "gap_mobiletl_minus_ft_blocks": round(mobiletl - blocks, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks/offline")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the grid and the demo")
    parser.add_argument("--skip-demo", action="store_true", help="do not time the no-flag demo run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = PRESETS["offline"]
    started = time.perf_counter()
    run_grid(grid, args.out, progress=False)
    rows = results_table(collect(grid, args.out))
    report = {"rows": rows, "targets": check_targets(rows), "grid_seconds": round(time.perf_counter() - started, 1),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_demo:
        seconds = time_demo(args.threads)
        report["demo_seconds"] = round(seconds, 1)
        report["targets"]["demo_under_2_minutes"] = seconds < DEMO_LIMIT_S
    (Path(args.out) / "benchmark.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(rows))
    print(json.dumps(report["targets"], indent=2))
    if "demo_seconds" in report:
        print(f"demo (mobiletl-edu train, no flags): {report['demo_seconds']} s")
    return 0 if all(v for k, v in report["targets"].items() if isinstance(v, bool)) else 1


if __name__ == "__main__":
    sys.exit(main())
