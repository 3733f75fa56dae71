"""Measured memory: what autograd keeps for backward, and what a training step holds.

``saved_activations`` runs one forward pass under ``torch.autograd.graph.saved_tensors_hooks``
and records every tensor autograd saves. Each storage is counted once (ReLU's output and the
next conv's input are one tensor), and parameters and buffers are left out: they live in
memory whether or not we train. Each storage is charged to the innermost module running when
it was first saved.

``step_memory`` measures one *warm* training step in a fresh process, three ways: the tensors
the allocator holds (``tensor_step``: torch.profiler's memory events on a CPU, the caching
allocator's peak on CUDA), the process's resident memory, and the stored activations. A first,
cold step also pays one-time costs (kernel code paged in, oneDNN's primitive cache, the
optimizer's state): it is reported apart, labelled cold.

``step_times`` times training steps of several setups, interleaved step by step, so that a
noisy machine slows them alike: compare their ratios, not their absolute times across runs.
"""
from __future__ import annotations

import contextlib
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
# One training step: its time, and its memory measured three ways


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, targets, mark=None):
    """Forward, cross-entropy (no targets: the output's mean), backward, optimizer step; each
    phase inside ``mark(phase)`` when given (a profiler range, say)."""
    mark = mark or (lambda phase: contextlib.nullcontext())
    with mark("forward"):
        out = model(inputs)
        loss = F.cross_entropy(out, targets) if targets is not None else out.float().mean()
    with mark("backward"):
        loss.backward()
    with mark("optimizer step"):
        optimizer.step()


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
            train_step(model, optimizer, x, targets)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class StepMemory:
    """Memory of one warm training step (forward, cross-entropy, backward, Adam step), in bytes.

    Three views of the same step, and the misleading fourth, each named for what it measures:

    * tensors, as the allocator sees them: ``state_bytes`` alive when the step begins (``state``
      by kind), and ``tensor_step_peak_bytes``, the most the step adds at any moment;
    * the process: ``process_growth_bytes`` (resident memory after the warm-up steps minus
      resident memory with model, optimizer and batch ready and no step run) and
      ``process_step_hwm_bytes`` (the resident high-water mark during one warm step minus the
      resident memory before it);
    * ``stored_activation_bytes``: what autograd keeps for backward (saved-tensor hooks);
    * ``cold_step_rss_bytes``: the first step's rise in resident memory, one-time costs included
      (kernels paged in, oneDNN caches, the optimizer's state): it hides the method's effect.
    """

    device: str
    threads: int
    warmup_steps: int
    state: dict  # bytes alive when the step begins: parameters, buffers, optimizer state, batch
    tensor_step_peak_bytes: int
    tensor_step_end_bytes: int  # what the step leaves allocated: the gradients
    stored_activation_bytes: int | None = None
    process_growth_bytes: int | None = None
    process_step_hwm_bytes: int | None = None
    cold_step_rss_bytes: int | None = None
    timeline: list | None = None  # (seconds from the step's start, bytes added), at every change
    phases: dict | None = None  # phase -> (start, end) in the timeline's seconds

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def tensor_peak_bytes(self) -> int:
        """The most tensor bytes alive at once during the step: the training peak."""
        return self.state_bytes + self.tensor_step_peak_bytes


def step_memory(spec: dict, device: str = "cpu", *, threads: int | None = 1, warmup: int = 2,
                timeline: bool = False, timeout: float = 900) -> StepMemory:
    """Measure one warm training step described by ``spec`` in a fresh process (``StepMemory``).

    ``spec``: ``{"model": name, "method": m, "blocks": k, "batch": 8, "resolution": 224,
    "classes": 10, "bottom_chunk": None}`` for a model, or ``{"block": "mbv3", "method": m,
    "input_shape": [8, 96, 7, 7], "expansion": 1, "kernel": 5}`` for a single block. A fresh
    process, because the operating system keeps one resident peak per process and the first step
    pays one-time costs. ``threads``: torch's CPU threads there (None: torch's default).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch.cuda.is_available() is False")
    _check_spec(spec)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 2:
        raise ValueError(f"warmup must be an integer of at least 2 (a warm step), got {warmup!r}")
    options = {"device": device, "threads": threads or 0, "warmup": warmup, "timeline": timeline}
    command = [sys.executable, "-m", "mobiletl_edu.measure", json.dumps(spec), json.dumps(options)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # importable without installing
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "KINETO_LOG_LEVEL": os.environ.get("KINETO_LOG_LEVEL", "6")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if last.startswith("ValueError: "):  # a bad spec: the same error as in this process
            raise ValueError(last[len("ValueError: "):])
        raise RuntimeError(f"the measuring process failed ({done.returncode}): {last}")
    return StepMemory(**json.loads(done.stdout.strip().splitlines()[-1]))


def _check_spec(spec) -> None:
    """The spec's names, checked here before a process is started for it."""
    from .methods import METHODS
    from .models import MODEL_NAMES
    from .profiler import BLOCK_KINDS
    if not isinstance(spec, dict) or ("model" in spec) == ("block" in spec):
        raise ValueError(f"spec must name exactly one of 'model' or 'block', got {spec!r}")
    for key, choices in (("model", MODEL_NAMES), ("block", BLOCK_KINDS), ("method", METHODS)):
        if (key in spec or key == "method") and spec.get(key) not in choices:
            raise ValueError(f"unknown {key} {spec.get(key)!r}; valid choices: {', '.join(choices)}")


def measured_report(spec: dict, device: str = "cpu", threads: int | None = 1) -> dict:
    """The measured views of ``spec`` (see ``StepMemory``), keyed as in the CLI's JSON."""
    m = step_memory(spec, device, threads=threads)
    return {"measured_tensor_peak_bytes": m.tensor_peak_bytes, "measured_state_bytes": m.state_bytes,
            "measured_tensor_step_peak_bytes": m.tensor_step_peak_bytes,
            "measured_process_growth_bytes": m.process_growth_bytes,
            "measured_process_step_hwm_bytes": m.process_step_hwm_bytes,
            "measured_activation_bytes": m.stored_activation_bytes,
            "measured_cold_step_rss_bytes": m.cold_step_rss_bytes}


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, *batch: torch.Tensor) -> dict:
    """Bytes of the tensors that exist before a step, by kind, each storage once: the model's
    parameters (as stored) and buffers, the optimizer's state, and the batch."""
    seen = set()

    def total(tensors):
        n = 0
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                n += t.untyped_storage().nbytes()
        return n

    from .quant import FrozenLayer
    frozen = [b for m in model.modules() if isinstance(m, FrozenLayer)
              for n, b in m.named_buffers(recurse=False) if n.startswith("weight")]
    return {"parameters": total([*model.parameters(), *frozen]), "buffers": total(model.buffers()),
            "optimizer state": total(v for s in optimizer.state.values() for v in s.values()),
            "batch": total(batch)}


def tensor_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor,
                targets: torch.Tensor | None, *, warmup: int = 2, timeline: bool = False) -> dict:
    """The allocator's view of one warm step, measured in this process (CPU or CUDA).

    Runs ``warmup`` steps (0: the caller has run them), frees their gradients
    (``zero_grad(set_to_none=True)``), then one step during which every tensor allocation and
    free is recorded (CPU: ``torch.profiler``'s memory events; CUDA: the caching allocator's
    peak). Returns ``state`` (bytes by kind when the step begins), ``step_peak_bytes``,
    ``step_end_bytes`` and, with ``timeline``, the live bytes added at every change and each
    phase's span in seconds.
    """
    model.train()
    for _ in range(warmup):
        optimizer.zero_grad(set_to_none=True)
        train_step(model, optimizer, inputs, targets)
    optimizer.zero_grad(set_to_none=True)
    state = state_bytes(model, optimizer, inputs, targets)
    if inputs.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(model, optimizer, inputs, targets)
        torch.cuda.synchronize()
        return {"state": state, "step_peak_bytes": torch.cuda.max_memory_allocated() - before,
                "step_end_bytes": torch.cuda.memory_allocated() - before}
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto's start/stop chatter on stderr
    from torch.profiler import ProfilerActivity, profile, record_function
    marks = _phase_marks(model, record_function)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            # the step's output and loss are freed when it returns, inside the profile
            train_step(model, optimizer, inputs, targets, lambda phase: record_function(f"phase: {phase}"))
    finally:
        for h in marks:
            h.remove()
    events = prof.profiler.kineto_results.events()
    changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    spans = {e.name()[len("phase: "):]: (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("phase: ")}
    live, peak, points = 0, 0, []
    for t, n in changes:
        live += n
        peak = max(peak, live)
        points.append((t, live))
    result = {"state": state, "step_peak_bytes": peak, "step_end_bytes": live}
    if timeline:
        t0 = spans["forward"][0]
        bottom_end = [e.start_ns() for e in events if e.name() == "mark: frozen bottom done"]
        if bottom_end:
            spans["frozen-bottom forward"] = (t0, bottom_end[0])
            spans["trained forward"] = (bottom_end[0], spans.pop("forward")[1])
        else:
            spans["trained forward"] = spans.pop("forward")
        result["timeline"] = [((t - t0) / 1e9, n) for t, n in points]
        result["phases"] = {k: ((a - t0) / 1e9, (b - t0) / 1e9) for k, (a, b) in spans.items()}
    return result


def _phase_marks(model: nn.Module, record_function) -> list:
    """A zero-length mark in the profile when the frozen bottom's last unit returns."""
    from .methods import frozen_bottom
    from .models import find_units
    try:
        bottom = frozen_bottom(model, find_units(model))
    except ValueError:  # a single block: no bottom
        return []
    if not bottom:
        return []

    def mark(module, args, output):
        with record_function("mark: frozen bottom done"):
            pass
    return [model.get_submodule(bottom[-1].path).register_forward_hook(mark)]


def _build_step(spec: dict, device: str):
    """(module, inputs, targets or None, optimizer) for ``spec``, on ``device``."""
    from .methods import prepare, prepare_block
    from .models import check_positive
    from .profiler import build_block

    if "model" in spec:
        batch, resolution, classes = (spec.get(k, d) for k, d in (("batch", 8), ("resolution", 224), ("classes", 10)))
        check_positive(batch=batch, resolution=resolution, classes=classes)
        module = prepare(spec["model"], spec["method"], spec.get("blocks"), num_classes=classes,
                         frozen_precision=spec.get("frozen_precision", "int8"), resolution=resolution,
                         bottom_chunk=spec.get("bottom_chunk")).model
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


def _measure_here(spec: dict, device: str, warmup: int, timeline: bool) -> StepMemory:
    """The measuring process of ``step_memory``: cold step, warm-up, process views, tensor view."""
    import gc

    module, inputs, targets, optimizer = _build_step(spec, device)
    module.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        train_step(module, optimizer, inputs, targets)

    gc.collect()
    ready = resident_bytes("VmRSS") or max_rss_bytes()
    reset = reset_peak_rss() and resident_bytes("VmHWM") is not None
    step()  # the cold step, the first of the warm-up steps
    cold = (resident_bytes("VmHWM") if reset else max_rss_bytes()) - ready
    for _ in range(warmup - 1):
        step()
    gc.collect()
    growth = (resident_bytes("VmRSS") or max_rss_bytes()) - ready
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    before = resident_bytes("VmRSS")
    hwm = None
    if reset and reset_peak_rss():
        step()  # a warm step
        hwm = resident_bytes("VmHWM") - before
    tensors = tensor_step(module, optimizer, inputs, targets, warmup=0, timeline=timeline)
    stored = saved_activations(module, inputs, targets).total_bytes
    return StepMemory(device, torch.get_num_threads(), warmup, tensors["state"], tensors["step_peak_bytes"],
                      tensors["step_end_bytes"], stored, growth if device == "cpu" else None,
                      hwm if device == "cpu" else None, cold if device == "cpu" else None,
                      tensors.get("timeline"), tensors.get("phases"))


if __name__ == "__main__":  # the measuring process of step_memory
    _spec, _options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    if _options["threads"]:
        torch.set_num_threads(_options["threads"])
    print(json.dumps(asdict(_measure_here(_spec, _options["device"], _options["warmup"], _options["timeline"]))))
