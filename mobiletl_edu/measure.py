"""Measured memory: what autograd really keeps for backward, and what a training step costs.

``saved_activations`` runs one forward pass under ``torch.autograd.graph.saved_tensors_hooks``
and records every tensor autograd saves. Each storage is counted once (ReLU's output and the
next conv's input are one tensor), and parameters and buffers are left out: they live in
memory whether or not we train. Each storage is charged to the innermost module running when
it was first saved.

``step_peak_memory`` runs one training step in a fresh Python process and reads the process's
peak resident memory from the operating system (``/proc/self/status``, else ``ru_maxrss``) and,
on CUDA, the caching allocator's peak. These are what a device would see; they include the
allocator's slack, so they are upper bounds on the analytic peak, not equal to it.

``step_times`` times training steps of several setups, interleaved step by step, so that a
noisy machine slows them alike: compare their ratios, not their absolute times across runs.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SavedActivations:
    total_bytes: int = 0
    per_module: dict = field(default_factory=lambda: defaultdict(int))  # module name -> bytes

    @property
    def total_mb(self) -> float:
        return self.total_bytes / 1e6


def saved_activations(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None,
                      backward: bool = True) -> SavedActivations:
    """Bytes saved for backward by one training step of ``model`` on ``inputs``.

    With ``targets`` the cross-entropy loss is included (charged to ``"loss"``); with
    ``backward`` the step is completed, so the graph is used and freed as in training.
    """
    excluded = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen, result, stack = set(), SavedActivations(), ["(top level)"]

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in seen:
            seen.add(key)
            result.total_bytes += storage.nbytes()
            result.per_module[stack[-1]] += storage.nbytes()
        return t

    def enter(name):
        return lambda module, args: stack.append(name or "(model)") and None

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(inputs)
            stack.append("loss")
            loss = F.cross_entropy(out, targets) if targets is not None else out.float().mean()
            stack.pop()
    finally:
        for h in handles:
            h.remove()
    if backward and loss.requires_grad:
        loss.backward()
    result.per_module = dict(result.per_module)
    return result


# ---------------------------------------------------------------------------------------------
# Peak memory of a training step, measured in a separate process


def step_times(setups: dict, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int = 30, warmup: int = 3,
               inputs_for: dict | None = None) -> dict:
    """Median seconds per training step (zero_grad, forward, cross-entropy backward, optimizer step).

    ``setups`` maps a name to ``(model, optimizer)`` (a ``Prepared`` fits); the setups take turns
    step by step, and the first ``warmup`` steps are not timed. ``inputs_for`` may give a setup
    its own inputs (the same batch in another memory layout, say).
    """
    inputs_for = inputs_for or {}
    times = {name: [] for name in setups}
    for step in range(warmup + steps):
        for name, (model, optimizer) in setups.items():
            x = inputs_for.get(name, inputs)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), targets).backward()
            optimizer.step()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class StepPeak:
    """Memory of one training step (forward, backward, optimizer step), in bytes."""

    device: str
    rss_before_step: int  # resident memory with the model, optimizer and batch ready
    rss_peak: int  # the most resident memory during the step (since the peak was reset)
    peak_reset: bool  # True: rss_peak covers the step alone; False: the process's lifetime peak
    cuda_allocated_before_step: int | None = None
    cuda_peak_allocated: int | None = None  # torch.cuda.max_memory_allocated during the step

    @property
    def rss_step_increase(self) -> int:
        return self.rss_peak - self.rss_before_step

    @property
    def cuda_step_increase(self) -> int | None:
        if self.cuda_peak_allocated is None:
            return None
        return self.cuda_peak_allocated - self.cuda_allocated_before_step


def step_peak_memory(spec: dict, device: str = "cpu", timeout: float = 600, threads: int | None = None) -> StepPeak:
    """Run one training step described by ``spec`` in a fresh process; return its peak memory.

    ``spec``: ``{"model": name, "method": m, "blocks": k, "batch": 8, "resolution": 224,
    "classes": 10}`` for a model, or ``{"block": "mbv3", "method": m, "input_shape": [8, 96, 7, 7],
    "expansion": 1, "kernel": 5}`` for a single block. A fresh process, because the OS keeps
    one peak per process. ``threads``: torch's CPU threads in that process (default: torch's).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    if not isinstance(spec, dict) or ("model" in spec) == ("block" in spec):
        raise ValueError(f"spec must name exactly one of 'model' or 'block', got {spec!r}")
    command = [sys.executable, "-m", "mobiletl_edu.measure", json.dumps(spec), device, str(threads or 0)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable without installing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if last.startswith("ValueError: "):  # a bad spec: the same error as in this process
            raise ValueError(last[len("ValueError: "):])
        raise RuntimeError(f"the measuring process failed ({done.returncode}): {last}")
    return StepPeak(**json.loads(done.stdout.strip().splitlines()[-1]))


def measured_report(spec: dict, device: str = "cpu", threads: int | None = None) -> dict:
    """The measured figures for ``spec`` (see ``step_peak_memory``), keyed as in the CLI's JSON."""
    module, inputs, targets, _ = _build_step(spec, "cpu")
    stored = saved_activations(module, inputs, targets).total_bytes
    peak = step_peak_memory(spec, device, threads=threads)
    return {"measured_activation_bytes": stored, "measured_rss_peak_bytes": peak.rss_peak,
            "measured_rss_step_increase_bytes": peak.rss_step_increase,
            "measured_cuda_peak_bytes": peak.cuda_peak_allocated}


def _build_step(spec: dict, device: str):
    """(module, inputs, targets or None, optimizer) for ``spec``, on ``device``."""
    from .methods import prepare, prepare_block
    from .models import check_positive
    from .profiler import build_block

    if "model" in spec:
        batch, resolution, classes = (spec.get(k, d) for k, d in (("batch", 8), ("resolution", 224), ("classes", 10)))
        check_positive(batch=batch, resolution=resolution, classes=classes)
        module = prepare(spec["model"], spec["method"], spec.get("blocks"), num_classes=classes,
                         frozen_precision=spec.get("frozen_precision", "int8")).model
        shape, targets = (batch, 3, resolution, resolution), torch.randint(0, classes, (batch,))
    else:
        shape = tuple(spec.get("input_shape", (8, 96, 7, 7)))
        if len(shape) != 4 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(f"input_shape must be four positive integers, got {shape!r}")
        block = build_block(spec["block"], shape[1], spec.get("expansion", 1), spec.get("kernel", 5))
        module, targets = prepare_block(block, spec["method"], spec.get("frozen_precision", "int8")), None
    module = module.to(device)
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=3e-4)
    inputs = torch.randn(shape, device=device).requires_grad_("block" in spec)
    return module, inputs, None if targets is None else targets.to(device), optimizer


def resident_bytes(field_name: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc, or None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident peak (VmHWM) of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: kilobytes


def _run_step_here(spec: dict, device: str) -> StepPeak:
    import gc

    module, inputs, targets, optimizer = _build_step(spec, device)
    module.train()
    gc.collect()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = resident_bytes("VmRSS") or max_rss_bytes()
    peak_reset = reset_peak_rss() and resident_bytes("VmHWM") is not None
    out = module(inputs)
    loss = F.cross_entropy(out, targets) if targets is not None else out.float().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if cuda:
        torch.cuda.synchronize()
    rss_peak = resident_bytes("VmHWM") if peak_reset else max_rss_bytes()
    return StepPeak(device, rss_before, rss_peak, peak_reset,
                    cuda_before if cuda else None, torch.cuda.max_memory_allocated() if cuda else None)


if __name__ == "__main__":  # the measuring process of step_peak_memory
    if int(sys.argv[3]):
        torch.set_num_threads(int(sys.argv[3]))
    print(json.dumps(asdict(_run_step_here(json.loads(sys.argv[1]), sys.argv[2]))))
