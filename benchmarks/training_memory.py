"""Training memory: the analytic peak against the allocator, its growth, bottom_chunk, what fits.

    nice .venv/bin/python benchmarks/training_memory.py                  # every part (hours on 2 cores)
    nice .venv/bin/python benchmarks/training_memory.py --parts agreement

Every measured configuration runs in a fresh process (``measure.step_memory``: a cold step,
warm-up, the process views, then one warm step whose tensor allocations torch.profiler
records) with one torch thread, and is cached as one JSON file in ``--cache``: an interrupted
run resumes where it stopped. Analytic peaks (``profiler.model_training_peak``, one thread)
are recomputed every run. The results go to ``--out`` (chapter 8 reads them) and print as
markdown tables. Parts:

* ``agreement``: every ``prepare`` method on MobileNetV2, V3-Small, V3-Large and ResNet-18
  (block-wise methods with 3 blocks) at four (batch, resolution) settings;
* ``growth``: six methods on MobileNetV3-Small, batch 1 to 64 at 224 px, and 96 to 320 px at batch 8;
* ``chunk``: ``bottom_chunk`` 4, 2 and 1 against none at batch 8, 224 px, for every method with
  a frozen bottom on MobileNetV2 and four on V3-Small (peak, and step time measured with the
  four setups interleaved in one process);
* ``fits``: the largest batch within 256 MB, 512 MB and 1 GB of tensors at 224 px on
  MobileNetV2, V3-Small and V3-Large for the six methods above and MobileTL-3 with
  ``bottom_chunk=1``, with V3-Small's 512 MB column measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mobiletl_edu.measure import step_memory, step_times
from mobiletl_edu.methods import FROZEN_BOTTOM_METHODS, GLOBAL_METHODS, METHODS, prepare
from mobiletl_edu.profiler import largest_batches, model_training_peak

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
SETTINGS = ((8, 224), (1, 224), (16, 96), (4, 160))  # (batch, resolution)
GROWTH_METHODS = ("ft-all", "ft-bn", "ft-bias", "ft-blocks", "mobiletl", "tinytl-lite-residual")
GROWTH_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GROWTH_RESOLUTIONS = (96, 128, 160, 192, 224, 256, 288, 320)
# every method with a frozen bottom on MobileNetV2, whose bottom's forward sets the peak; four on V3-Small
CHUNK_METHODS = {"mobilenet_v2": FROZEN_BOTTOM_METHODS,
                 "mobilenet_v3_small": ("ft-last", "ft-blocks", "mobiletl", "tinytl-lite-residual")}
CHUNKS = (None, 4, 2, 1)
FIT_MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
BUDGETS = {"256 MB": 256 * 10**6, "512 MB": 512 * 10**6, "1 GB": 10**9}
MEASURED_BUDGET, MEASURED_FIT_MODEL = "512 MB", "mobilenet_v3_small"
FIT_SETTINGS = [(m, None) for m in GROWTH_METHODS] + [("mobiletl", 1)]  # (method, bottom_chunk)
PARTS = ("agreement", "growth", "chunk", "fits")
BLOCKS = 3


def blocks_for(method):
    return None if method in GLOBAL_METHODS else BLOCKS


def applies(model: str, method: str) -> str | None:
    """None if ``prepare`` accepts the method for the model, else its reason (the skip is reported)."""
    try:
        prepare(model, method, blocks_for(method), num_classes=10)
    except ValueError as error:
        return str(error)
    return None


def spec_of(model, method, batch, resolution, chunk=None):
    return dict(model=model, method=method, blocks=blocks_for(method), batch=batch, resolution=resolution,
                classes=10, bottom_chunk=chunk)


def measured(spec: dict, cache: Path) -> dict:
    """``step_memory`` of ``spec`` in a fresh process, cached by the spec's content."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["measured"]
    result = dataclasses.asdict(step_memory(spec, threads=1))
    result["tensor_peak_bytes"] = sum(result["state"].values()) + result["tensor_step_peak_bytes"]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec, "measured": result}))
    tmp.replace(path)  # whole or not at all
    return result


def analytic(spec: dict) -> dict:
    peak = model_training_peak(spec["model"], spec["method"], spec["blocks"], batch=spec["batch"],
                               resolution=spec["resolution"], classes=spec["classes"],
                               bottom_chunk=spec["bottom_chunk"], threads=1)
    return {"bytes": peak.bytes, "state_bytes": peak.state_bytes, "step_bytes": peak.step_bytes,
            "phase": peak.phase, "layer": peak.layer}


def row(spec: dict, cache: Path) -> dict:
    m, a = measured(spec, cache), analytic(spec)
    return {**spec, "measured": m, "analytic": a, "error": a["bytes"] / m["tensor_peak_bytes"] - 1,
            "step_error": a["step_bytes"] / m["tensor_step_peak_bytes"] - 1}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def agreement(cache: Path) -> dict:
    rows, skipped = [], []
    for model in MODELS:
        for method in METHODS:
            reason = applies(model, method)
            if reason:
                skipped.append({"model": model, "method": method, "reason": reason})
                continue
            for batch, resolution in SETTINGS:
                rows.append(row(spec_of(model, method, batch, resolution), cache))
                log(f"agreement {model} {method} {batch}x{resolution}: {100 * rows[-1]['error']:+.2f} %")
    return {"rows": rows, "skipped": skipped}


def growth(cache: Path) -> list:
    rows = []
    for method in GROWTH_METHODS:
        for batch in GROWTH_BATCHES:
            rows.append({**row(spec_of("mobilenet_v3_small", method, batch, 224), cache), "axis": "batch"})
        for resolution in GROWTH_RESOLUTIONS:
            rows.append({**row(spec_of("mobilenet_v3_small", method, 8, resolution), cache), "axis": "resolution"})
        log(f"growth {method} done")
    return rows


def chunk(cache: Path, steps: int) -> list:
    rows = []
    for model, methods in CHUNK_METHODS.items():
        for method in methods:
            if applies(model, method):
                continue
            times = _chunk_times(model, method, steps)
            for c in CHUNKS:
                rows.append({**row(spec_of(model, method, 8, 224, c), cache), "step_seconds": times[str(c)]})
            log(f"chunk {model} {method}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
    return rows


def _chunk_times(model: str, method: str, steps: int) -> dict:
    """Median step time of each chunk, the setups interleaved step by step (one thread)."""
    setups = {}
    for c in CHUNKS:
        torch.manual_seed(0)
        setups[str(c)] = tuple(prepare(model, method, blocks_for(method), num_classes=10, bottom_chunk=c))
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))
    return step_times(setups, x, y, steps=steps, warmup=2)


def fits(cache: Path) -> list:
    rows = []
    for model in FIT_MODELS:
        for method, chunk in FIT_SETTINGS:
            batches = largest_batches(model, method, blocks_for(method), list(BUDGETS.values()), threads=1,
                                      bottom_chunk=chunk)
            entry = {"model": model, "method": method, "blocks": blocks_for(method), "bottom_chunk": chunk,
                     "largest": dict(zip(BUDGETS, batches))}
            largest = entry["largest"][MEASURED_BUDGET]
            if largest and model == MEASURED_FIT_MODEL:
                entry["measured_at_largest"] = measured(spec_of(model, method, largest, 224, chunk), cache)
            rows.append(entry)
            log(f"fits {model} {method} chunk {chunk}: {entry['largest']}")
    return rows


# --- tables -------------------------------------------------------------------------------------
def mb(n):
    return f"{n / 1e6:.1f}"


def agreement_table(result: dict) -> str:
    rows = sorted(result["rows"], key=lambda r: -abs(r["error"]))
    lines = ["| model | method | batch x px | measured MB (state + step) | analytic MB | error | step error "
             "| analytic peak at |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        m, a = r["measured"], r["analytic"]
        lines.append(f"| {r['model']} | {r['method']} | {r['batch']} x {r['resolution']} | "
                     f"{mb(m['tensor_peak_bytes'])} ({mb(sum(m['state'].values()))} + "
                     f"{mb(m['tensor_step_peak_bytes'])}) | {mb(a['bytes'])} | {100 * r['error']:+.2f} % | "
                     f"{100 * r['step_error']:+.2f} % | {a['phase']}, {a['layer']} |")
    worst = max(abs(r["error"]) for r in rows)
    lines.append(f"\n{len(rows)} settings; largest difference {100 * worst:.2f} % of the measured peak.")
    lines += [f"skipped {s['model']} {s['method']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def chunk_table(rows: list) -> str:
    lines = ["| model | method | chunk | measured peak MB | analytic MB | step s |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['bottom_chunk'] or 'none'} | "
                     f"{mb(r['measured']['tensor_peak_bytes'])} | {mb(r['analytic']['bytes'])} | "
                     f"{r['step_seconds']:.3f} |")
    return "\n".join(lines)


def fits_table(rows: list) -> str:
    lines = ["| model | method | chunk | " + " | ".join(BUDGETS) + f" | measured peak at the {MEASURED_BUDGET} batch |",
             "|---|---|---|" + "---:|" * (len(BUDGETS) + 1)]
    for r in rows:
        at = r.get("measured_at_largest")
        lines.append(f"| {r['model']} | {r['method']} | {r.get('bottom_chunk') or 'none'} | "
                     + " | ".join(str(r["largest"][b]) for b in BUDGETS)
                     + f" | {mb(at['tensor_peak_bytes']) + ' MB' if at else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--cache", default="runs/benchmarks/training_memory", help="one JSON per measured setting")
    parser.add_argument("--out", default="book/data/training_memory.json")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per chunk setting")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r}; valid choices: {', '.join(PARTS)}")
    torch.set_num_threads(1)
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    start = time.time()
    for part in parts:
        results[part] = {"agreement": lambda: agreement(cache), "growth": lambda: growth(cache),
                         "chunk": lambda: chunk(cache, args.steps), "fits": lambda: fits(cache)}[part]()
        results.setdefault("provenance", {})[part] = {
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": 1,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}",
            "command": "nice .venv/bin/python benchmarks/training_memory.py --parts " + part
            + (f" --steps {args.steps}" if part == "chunk" else "")}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out)
    for part, table in (("agreement", agreement_table), ("chunk", chunk_table), ("fits", fits_table)):
        if part in parts:
            print(f"## {part}\n\n{table(results[part])}\n")
    print(f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
