"""The paper's Table 6 protocol on whatever machine runs it: training-step latency per method.

MobileNetV3-Small, batch 8, 224x224, 10 classes, random data, warm-up, then ``steps`` timed
steps per method (zero_grad, forward, cross-entropy, backward, Adam), the methods taking turns
step by step so that the machine's noise hits them alike. The timing loop is the device
runner's own (``run.time_steps``), so a bundle's ``run.py --bench`` and ``mobiletl-edu bench``
time the same thing.
"""
from __future__ import annotations

import platform

import torch
from torch import nn

from ..choices import BLOCK_METHODS, METHODS, TABLE6_METHODS
from ..methods import prepare
from ..models import check_positive
from . import run as runner


def method_label(method: str, blocks: int | None) -> str:
    return f"{method}-{blocks}" if method in BLOCK_METHODS else method


def bench(model: str = "mobilenet_v3_small", methods=TABLE6_METHODS, blocks: int = 3, *, steps: int = 20,
          warmup: int = 5, batch: int = 8, resolution: int = 224, classes: int = 10, threads: int | None = None,
          device: str = "cpu", seed: int = 0) -> dict:
    """Time every method's training step; a report with mean, median, spread and ratio to the first."""
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or methods}; valid choices: {', '.join(METHODS)}")
    check_positive(steps=steps, batch=batch, resolution=resolution, classes=classes)
    if warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {warmup}")
    if threads is not None:
        check_positive(threads=threads)
        torch.set_num_threads(threads)
    where = torch.device(device)
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    inputs = torch.randn(batch, 3, resolution, resolution, device=where)
    targets = torch.randint(0, classes, (batch,), device=where)
    setups = []
    for method in methods:
        k = blocks if method in BLOCK_METHODS else None
        network, optimizer = prepare(model, method, k, num_classes=classes, resolution=resolution)
        network.to(where)  # moves the parameters' data: the optimizer keeps them
        setups.append((method_label(method, k), network, optimizer, nn.CrossEntropyLoss(), inputs, targets))
    results = runner.compare(runner.time_steps(setups, steps, warmup, where))
    return {"model": model, "batch": batch, "resolution": resolution, "classes": classes, "steps": steps,
            "warmup": warmup, "threads": torch.get_num_threads(), "device": str(where),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "results": results}


def bench_table(report: dict) -> str:
    """The report as a markdown table, one row per method."""
    first = next(iter(report["results"]))
    lines = [f"| method | mean s | median s | q1-q3 s | {first} / method |", "|---|---:|---:|---:|---:|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['mean_s']:.4f} | {r['median_s']:.4f} | {r['q1_s']:.4f}-{r['q3_s']:.4f} "
                     f"| {r['ratio_to_first']:.2f}x |")
    return "\n".join(lines)
