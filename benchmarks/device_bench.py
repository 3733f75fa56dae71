"""Table 6 on our stacks: the bundle runner's step latency per method on each software stack.

Four bundles (MobileNetV3-Small, FT-All, FT-BN, FT-Bias, MobileTL-3; batch 8, 224x224, 10
classes, random data) are timed by ``run.py --bench --with ...``, the methods interleaved, on

* ``host``: this machine's torch 2.14 (the package's own environment);
* ``nano-py36``: Python 3.6 + torch 1.10.1, the Jetson Nano's software on this machine's CPU;
* ``nano-arm64`` and ``pi4-arm64``: the Nano's and the Pi 4's arm64 stacks under qemu. Emulation
  stretches every instruction differently from real silicon, so only the ratios of these runs
  mean anything; their seconds are recorded and must not be read as device times.

Then each bundle alone, in its own process, on ``host`` and ``nano-py36``: the peak resident
memory the operating system saw for a few steps (what the device would see, less CUDA's share).

Last, the runner's step against the package's on the same weights and batch, on each Nano
stack (tests/device_step.py): the relative difference of the losses and the largest gradient
difference, for the book.

Writes book/data/table6_ours.json. The emulated runs take about an hour on a busy 2-core machine:

    nice .venv/bin/python benchmarks/device_bench.py --threads 1
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobiletl_edu.choices import TABLE6_METHODS
from mobiletl_edu.deploy import stacks
from mobiletl_edu.deploy.bundle import write_bundle

REPO = Path(__file__).resolve().parents[1]
STACK_STEPS = {"host": (20, 3), "nano-py36": (20, 3), "nano-arm64": (2, 1), "pi4-arm64": (2, 1)}
EMULATED = ("nano-arm64", "pi4-arm64")


def step_equality(work: Path) -> dict:
    """Loss and gradients of one step: the runner on each Nano stack against the package here."""
    import torch
    import torch.nn.functional as F

    from mobiletl_edu.deploy import bundle
    from mobiletl_edu.deploy import run as runner
    folder = work / "equality"
    write_bundle(folder, method="mobiletl", blocks=3, device="nano", classes=5, weights="source", resolution=64)
    torch.manual_seed(3)
    inputs, targets = torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,))
    (work / "batch.safetensors").write_bytes(runner.tensors_bytes({"inputs": inputs, "targets": targets}))
    network = bundle.bundle_model(folder)[0].train()
    torch.manual_seed(1)
    loss = F.cross_entropy(network(inputs), targets)
    loss.backward()
    grads = {n: p.grad for n, p in network.named_parameters() if p.requires_grad}
    result = {}
    for name in ("nano-py36", "nano-arm64"):
        command, env = stacks.python_command(name)
        subprocess.run(command + [str(REPO / "tests" / "device_step.py"), str(folder), str(work / "batch.safetensors"),
                                  str(work / f"{name}.safetensors")], env=env, check=True, capture_output=True)
        theirs, metadata = runner.parse_tensors((work / f"{name}.safetensors").read_bytes(), name)
        result[name] = {"torch": metadata["torch"], "python": metadata["python"], "loss": float(metadata["loss"]),
                        "package_loss": loss.item(),
                        "loss_relative_difference": abs(float(metadata["loss"]) - loss.item()) / loss.item(),
                        "max_gradient_difference": max((theirs["grad." + n] - g).abs().max().item()
                                                       for n, g in grads.items()),
                        "max_gradient": max(g.abs().max().item() for g in grads.values())}
        print(name, result[name], flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stacks", default=",".join(STACK_STEPS))
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    out = REPO / "book" / "data" / "table6_ours.json"
    record = json.loads(out.read_text()) if out.exists() else {"stacks": {}}
    with tempfile.TemporaryDirectory() as work:
        folders = []
        for method in TABLE6_METHODS:
            folder = Path(work) / method
            write_bundle(folder, method=method, blocks=3 if method == "mobiletl" else None, device="nano",
                         classes=10, weights="none")
            folders.append(folder)
        for name in args.stacks.split(","):
            steps, warmup = STACK_STEPS[name]
            argv = [str(folders[0] / "run.py"), "--bench", "--with", ",".join(map(str, folders[1:])), "--steps",
                    str(steps), "--warmup", str(warmup), "--threads", str(args.threads), "--json"]
            if name == "host":
                command, env = [sys.executable], None
            else:
                command, env = stacks.python_command(name, threads=args.threads)
            began = time.time()
            done = subprocess.run(command + argv, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{name}: {done.stderr[-2000:]}")
            report = json.loads(done.stdout)
            report.update(stack=name, emulated=name in EMULATED, wall_s=round(time.time() - began),
                          what=stacks.STACKS[name].what if name in stacks.STACKS else "this machine's torch")
            record["stacks"][name] = report
            out.write_text(json.dumps(record, indent=1) + "\n")  # each stack kept as soon as it is done
            print(name, {k: f"{v['mean_s']:.3f} s, {v['ratio_to_first']:.2f}x" for k, v in report["results"].items()},
                  flush=True)
            if name in ("host", "nano-py36"):
                report["alone_peak_resident_bytes"] = {}
                for folder in folders:
                    alone = [str(folder / "run.py"), "--bench", "--steps", "3", "--warmup", "1", "--threads",
                             str(args.threads), "--json"]
                    done = subprocess.run(command + alone, capture_output=True, text=True, env=env, check=True)
                    peak = json.loads(done.stdout)["memory"]["peak_resident_bytes"]
                    report["alone_peak_resident_bytes"][folder.name] = peak
                print(name, "peak resident MB alone:",
                      {k: round(v / 1e6) for k, v in report["alone_peak_resident_bytes"].items()}, flush=True)
        record["equality"] = step_equality(Path(work))
    record["made"] = (f"benchmarks/device_bench.py --threads {args.threads}, last run started {started} on "
                      f"{platform.machine()} ({platform.processor() or 'unknown CPU'})")
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
