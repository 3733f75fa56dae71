"""Fit the latency model (mobiletl_edu.deploy.latency) and test it on Table 6's held-out cells.

1. On this machine: every layer phase of MobileNetV3-Small's training step (batch 8, 224x224,
   10 classes) for FT-All, FT-BN, FT-Bias, MobileTL-3 and, for variety, FT-3-BLKs and
   MobileTL-6, each timed in isolation (the fastest of ``--repeats`` runs, over ``--rounds``
   rounds), for two versions of each network: as a plain PyTorch implementation runs it
   (frozen weights in float, frozen BNs kept: what the paper's Table 6 timed, as far as we
   can tell) and as our bundle runs it (int8 frozen weights, BNs folded into the frozen
   convolutions, channels_last). These host times alone fix the model's constants.
2. The Table 6 methods' whole steps, interleaved (mobiletl_edu.deploy.bench): the host
   model's own check; and ``run.calibrate``'s micro-benchmarks, kept for calibrating devices.
3. Per device, two Table 6 cells (FT-All, FT-Bias) fix its slowdown and its per-op overhead,
   with the plain networks; FT-BN and MobileTL-3 are predicted and compared with the paper
   (held out). For a wider test every pair of cells takes a turn as the fit. A spec-sheet
   roofline is computed beside them, and the device constants predict our bundles' steps.

Writes book/data/latency_phases.csv, book/data/latency_fit.json and the constants the package
reads, mobiletl_edu/deploy/latency_constants.json. About 5 minutes with one thread:

    nice .venv/bin/python benchmarks/latency_fit.py --threads 1
"""
import argparse
import csv
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from mobiletl_edu.deploy import bench, latency
from mobiletl_edu.deploy import run as runner
from mobiletl_edu.deploy.devices import DEVICES
from mobiletl_edu.profiler import REPORTED

REPO = Path(__file__).resolve().parents[1]
TABLE6 = {"nano": REPORTED["table6"]["nano"], "pi4": REPORTED["table6"]["pi"]}
TABLE6_SETUPS = {"ft-all": ("ft-all", None), "ft-bn": ("ft-bn", None), "ft-bias": ("ft-bias", None),
                 "mobiletl": ("mobiletl", 3)}
EXTRA_SETUPS = {"ft-blocks-3": ("ft-blocks", 3), "mobiletl-6": ("mobiletl", 6)}
FIT_CELLS = ("ft-all", "ft-bias")  # the two Table 6 cells per device the fit may see


VARIANTS = {"plain": True, "bundle": False}  # label -> method_phases(paper_like=...)


def measure(setups, rounds, repeats):
    """{(variant, label): phases}, each phase's time the fastest over all rounds."""
    best = {}
    for r in range(rounds):
        for key in [(v, label) for v in VARIANTS for label in setups]:
            (method, blocks), started = setups[key[1]], time.time()
            phases = latency.method_phases("mobilenet_v3_small", method, blocks, measure=True, repeats=repeats,
                                           paper_like=VARIANTS[key[0]])
            label = key
            if label in best:
                phases = [p._replace(seconds=min(p.seconds, q.seconds)) for p, q in zip(phases, best[label])]
            best[label] = phases
            print(f"round {r + 1}: {'/'.join(label)} {len(phases)} phases, sum "
                  f"{sum(p.seconds for p in phases):.3f} s ({time.time() - started:.0f} s)", flush=True)
    return best


def device_fit(host, phases, reported, fit_cells, processor):
    slowdown = latency.fit_device(host, {m: (phases[("plain", m)], reported[m]) for m in fit_cells}, processor)
    return slowdown, host.on_device(slowdown)


def read_phases(path):
    """The phases a previous run wrote to latency_phases.csv (for --refit)."""
    phases = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = [row[k] for k in latency.Phase._fields]
            phase = latency.Phase(values[0], values[1], values[2], *map(int, values[3:7]), float(values[7]))
            phases.setdefault((row["variant"], row["setup"]), []).append(phase)
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="whole steps per method in the host bench")
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: refit from the committed latency_phases.csv and latency_fit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = REPO / "book" / "data"
    if args.refit:
        phases, previous = read_phases(data / "latency_phases.csv"), json.loads((data / "latency_fit.json").read_text())
        made, machine, micro = previous["made"], previous["machine"], previous["host_micro"]
        host_measured = {m: r["measured_s"] for m, r in previous["host"].items()}
    else:
        made = (f"benchmarks/latency_fit.py --threads {args.threads} --rounds {args.rounds} --repeats "
                f"{args.repeats} --steps {args.steps}, started {time.strftime('%Y-%m-%d %H:%M')}")
        machine = (f"{platform.machine()} {platform.processor()}, {torch.get_num_threads()} thread(s), "
                   f"torch {torch.__version__}")
        phases = measure({**TABLE6_SETUPS, **EXTRA_SETUPS}, args.rounds, args.repeats)
        host_bench = bench.bench(steps=args.steps, warmup=3, threads=args.threads)
        host_measured = {m: host_bench["results"][bench.method_label(*TABLE6_SETUPS[m])]["mean_s"]
                         for m in TABLE6_SETUPS}
        micro = runner.calibrate(torch.device("cpu"))
    host = latency.fit_host([p for ph in phases.values() for p in ph])

    devices = {}
    for device, reported in TABLE6.items():
        profile = DEVICES[device]
        slowdown, constants = device_fit(host, phases, reported, FIT_CELLS, profile.processor)
        rows = {}
        for m in TABLE6_SETUPS:
            plain = phases[("plain", m)]
            predicted = latency.predict(plain, constants)
            rows[m] = {"reported_s": reported[m], "predicted_s": predicted, "error": predicted / reported[m] - 1,
                       "held_out": m not in FIT_CELLS, "split_s": latency.split(plain, constants),
                       "bundle_predicted_s": latency.predict(phases[("bundle", m)], constants),
                       "roofline_s": latency.roofline(plain, profile.peak_flops_per_s, profile.peak_bytes_per_s)}
        pairs = {}
        for pair in itertools.combinations(TABLE6_SETUPS, 2):
            c = device_fit(host, phases, reported, pair, profile.processor)[1]
            pairs["+".join(pair)] = {m: latency.predict(phases[("plain", m)], c) / reported[m] - 1
                                     for m in TABLE6_SETUPS if m not in pair}
        other = "gpu" if profile.processor == "cpu" else "cpu"
        other_constants = device_fit(host, phases, reported, FIT_CELLS, other)[1]
        devices[device] = {"processor": profile.processor, "slowdown": slowdown._asdict(),
                           "per_op_s": constants.per_op, "fit_cells": list(FIT_CELLS), "methods": rows,
                           "every_pair": pairs,
                           "other_tie": {"tied": latency.TIED[other], "per_op_s": other_constants.per_op,
                                         "errors": {m: latency.predict(phases[("plain", m)], other_constants)
                                                    / reported[m] - 1 for m in TABLE6_SETUPS}}}
        print(device, f"slowdown {slowdown}, per-op {constants.per_op * 1e6:.1f} us:",
              ", ".join(f"{m} {r['predicted_s']:.3f} s vs {r['reported_s']:.3f} ({100 * r['error']:+.0f}%)"
                        for m, r in rows.items()), flush=True)
        for pair, errors in pairs.items():
            print(f"   fit on {pair}: " + ", ".join(f"{m} {100 * e:+.0f}%" for m, e in errors.items()))

    host_rows = {m: {"measured_s": host_measured[m],
                     "sum_of_phases_s": sum(p.seconds for p in phases[("bundle", m)]),
                     "predicted_s": latency.predict(phases[("bundle", m)], host)} for m in TABLE6_SETUPS}
    record = {
        "made": made, "machine": machine,
        "workload": "mobilenet_v3_small, batch 8, 224x224, 10 classes, blocks 3 (MobileTL)",
        "host_constants": host.to_dict(), "host_micro": micro, "host": host_rows, "devices": devices,
        "totals": {"/".join(k): {"ops": sum(p.ops for p in ph), "flops": sum(p.flops + p.weight_flops for p in ph),
                                 "bytes": sum(p.bytes for p in ph), "isolated_s": sum(p.seconds for p in ph)}
                   for k, ph in phases.items()},
    }
    (data / "latency_fit.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.refit:
        with open(data / "latency_phases.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["variant", "setup", *latency.Phase._fields])
            for (variant, label), ph in phases.items():
                writer.writerows([variant, label, *p] for p in ph)
    constants = {"made": record["made"], "machine": record["machine"], "host": host.to_dict(), "host_micro": micro,
                 "devices": {d: {"processor": v["processor"], "slowdown": v["slowdown"],
                                 "fit_cells": v["fit_cells"]} for d, v in devices.items()}}
    (REPO / "mobiletl_edu" / "deploy" / "latency_constants.json").write_text(json.dumps(constants, indent=1) + "\n")
    print("host: " + ", ".join(f"{m} measured {r['measured_s']:.3f} s, isolated sum {r['sum_of_phases_s']:.3f}, "
                               f"model {r['predicted_s']:.3f}" for m, r in host_rows.items()))


if __name__ == "__main__":
    main()
