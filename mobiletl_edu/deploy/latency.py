"""A latency model of one training step, fitted honestly to what we can measure.

A step is a list of *layer phases* (each layer's forward, and its backward when a gradient
passes it), plus the optimizer. Each phase does ``flops`` (the profiler's count), launches
``ops`` tensor operations and moves ``bytes`` (both counted by running it once: every
operation reads its inputs and writes its outputs). Its time is modelled as

    t = flops * a[kind, pass] + bytes * b + ops * c

with ``a`` the seconds per FLOP of one kind of layer (convolution, depthwise convolution,
linear, trained BatchNorm) in one pass (forward, the gradient with respect to the input, the gradient with
respect to the weights: the profiler counts the three apart), ``b`` the seconds per byte,
``c`` the fixed cost of launching one operation. A trained BatchNorm reads its input several times (batch statistics, then the
normalization; more in backward), so it is priced by its FLOPs like the layers that compute.
The other elementwise layers (frozen and shift-only BNs, activations, pooling, sums, the loss,
Adam) do a few FLOPs per byte they move: memory traffic and overhead alone price them. A peak-FLOPs roofline keeps only the first term at the spec sheet's
rate and misses the paper's Table 6 by 20-50x: small depthwise and elementwise layers are
bound by memory traffic and by per-operation overhead, not by arithmetic.

The fit uses what we are allowed to see. The host's own per-layer times (each layer phase
timed in isolation here) fix ``a``, ``b`` and ``c`` for this machine. A device is slower than
the host by three factors, one per term (``Slowdown``); two of them share a cause and are
fitted as one (``TIED``: on a CPU the arithmetic and the per-operation work run on the same
cores; on a GPU the arithmetic and the memory traffic are the GPU's), so two numbers per
device remain. Two of Table 6's four cells per device (FT-All and FT-Bias) fix them; the
other two cells are predictions, and their error is the model's honest test.
``run.py --calibrate`` measures all three factors on a real device instead (a matrix
product, a copy, and tiny operations, against the same on the host).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import nnls
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.ops.misc import SqueezeExcitation

from ..methods import BLOCK_METHODS, prepare
from ..profiler import RESIDUAL_BLOCKS, count, trace
from ..quant import FrozenLayer

CONSTANTS_FILE = Path(__file__).resolve().with_name("latency_constants.json")  # benchmarks/latency_fit.py
KINDS = ("conv", "depthwise", "linear", "batchnorm", "elementwise")
PHASES = ("forward", "backward")
ARITHMETIC_KINDS = KINDS[:-1]  # elementwise layers: bytes and ops only
OPTIMIZER = "optimizer"


class Phase(NamedTuple):
    """One layer's forward or backward pass in a training step (or the optimizer's update)."""

    layer: str
    kind: str  # one of KINDS
    phase: str  # "forward", "backward" or "optimizer"
    flops: int  # forward, or backward with respect to the input
    weight_flops: int  # backward with respect to the weights
    bytes: int
    ops: int
    seconds: float | None = None  # measured in isolation, when asked for


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class _OpCounter(TorchDispatchMode):
    """Counts the tensor operations (ATen calls below autograd) that run inside it, and the bytes
    they touch: every input read once, every output written once (views of one tensor once)."""

    def __init__(self):
        super().__init__()
        self.ops = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        seen = {}
        for t in (*_tensors(args), *_tensors(kwargs or {}), *_tensors(out)):
            if t.device.type != "meta":
                seen[(t.untyped_storage().data_ptr(), t.data_ptr())] = t.numel() * t.element_size()
        self.bytes += sum(seen.values())
        return out


def layer_kind(module) -> str:
    if isinstance(module, FrozenLayer):
        if module.conv_args is None:
            return "linear"
        groups = module.conv_args["groups"]
        return "depthwise" if groups > 1 and groups == module.in_features else "conv"
    if isinstance(module, nn.Conv2d):
        return "depthwise" if module.groups > 1 and module.groups == module.in_channels else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.BatchNorm2d):  # a trained BN: batch statistics, several passes
        return "batchnorm"
    return "elementwise"


def _own_op(call, targets):
    """The computation a traced layer does itself, as a function of its input (None: nothing).

    Leaf modules run themselves; containers contribute only their own operation (the
    squeeze-excitation product, the residual sum, the functional pooling, the loss)."""
    m = call.module
    if m is None:  # the loss
        return lambda x: F.cross_entropy(x, targets)
    if isinstance(m, SqueezeExcitation):
        scale = call.parts["scale_activation"].detach().requires_grad_(call.parts["scale_activation"].requires_grad)
        return lambda x: scale * x
    if isinstance(m, RESIDUAL_BLOCKS) or (next(m.children(), None) is not None and call.parts.get("patch") is not None):
        other = call.y.detach().clone()
        return lambda x: other + x
    if next(m.children(), None) is None:
        return (lambda x: m(x.clone())) if getattr(m, "inplace", False) else m
    if call.parts.get("features") is not None:  # MobileNetV2's functional pooling
        return lambda x: torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
    return None


def _time(function, repeats: int) -> float:
    """The fastest of ``repeats`` runs: the least disturbed by a busy machine."""
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def step_phases(network: nn.Module, input_shape=(8, 3, 224, 224), *, measure: bool = False,
                repeats: int = 5) -> list[Phase]:
    """Every layer phase of one training step of ``network`` (prepared), and the optimizer.

    With ``measure`` each phase is also timed on this machine, in isolation: the layer's own
    computation on a copy of the input it saw in the traced step, ``repeats`` times (the
    fastest counts); a backward pass re-runs on the kept graph.
    """
    traced = trace(network, input_shape)
    profile = count(traced, "pytorch")
    targets = torch.zeros(input_shape[0], dtype=torch.long)
    phases = []
    for call, layer in zip(traced.calls, profile.layers):
        op = _own_op(call, targets)
        if op is None:
            continue
        kind = layer_kind(call.module)
        x = call.x.detach().clone().requires_grad_(call.x.requires_grad)
        counter = _OpCounter()
        with counter:
            y = op(x)
        phases.append(Phase(layer.name, kind, "forward", layer.forward_flops, 0, counter.bytes, counter.ops,
                            _time(lambda: op(x), repeats) if measure else None))
        if not (isinstance(y, torch.Tensor) and y.requires_grad):
            continue
        grad = torch.ones_like(y) if y.dim() == 0 else torch.randn_like(y)
        counter = _OpCounter()
        with counter:
            torch.autograd.backward(y, grad, retain_graph=True)
        seconds = _time(lambda: torch.autograd.backward(y, grad, retain_graph=True), repeats) if measure else None
        phases.append(Phase(layer.name, kind, "backward", layer.backward_input_flops, layer.backward_weight_flops,
                            counter.bytes, counter.ops, seconds))
    for p in network.parameters():
        p.grad = None
    phases.append(optimizer_phase(network, measure=measure, repeats=repeats))
    return phases


def optimizer_phase(network: nn.Module, *, measure: bool = False, repeats: int = 5) -> Phase:
    """Adam's update of the trainable parameters (about ten FLOPs per parameter)."""
    params = [p.detach().clone().requires_grad_() for p in network.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.Adam(params, lr=1e-6)
    optimizer.step()  # the moments exist from here on, as in every step after the first
    counter = _OpCounter()
    with counter:
        optimizer.step()
    n = sum(p.numel() for p in params)
    seconds = _time(optimizer.step, repeats) if measure else None
    return Phase(OPTIMIZER, "elementwise", OPTIMIZER, 10 * n, 0, counter.bytes, counter.ops, seconds)


def method_phases(model: str, method: str, blocks: int | None = 3, *, batch: int = 8, resolution: int = 224,
                  classes: int = 10, measure: bool = False, repeats: int = 5, paper_like: bool = False) -> list:
    """``step_phases`` of a model prepared for ``method`` (``blocks`` for block-wise methods).

    ``paper_like``: frozen weights in float and frozen BNs kept, as a plain PyTorch
    implementation of the paper's methods would run; otherwise the bundle's own network.
    """
    k = blocks if method in BLOCK_METHODS else None
    precision = "float" if paper_like else "int8"
    network = prepare(model, method, k, num_classes=classes, frozen_precision=precision,
                      optimize_bottom=not paper_like, resolution=resolution).model
    return step_phases(network, (batch, 3, resolution, resolution), measure=measure, repeats=repeats)


# ---------------------------------------------------------------------------------------------
# The model and its fit


class Slowdown(NamedTuple):
    """How many times slower than the host a device is at arithmetic, at memory traffic and
    per operation: its three constants, relative to the host's."""

    arithmetic: float
    memory: float
    overhead: float


class Constants(NamedTuple):
    """Seconds per FLOP by (kind, pass), seconds per byte, seconds per operation."""

    per_flop: dict  # "kind/pass" -> seconds per FLOP (elementwise layers have none)
    per_byte: float
    per_op: float

    def on_device(self, slowdown: Slowdown) -> Constants:
        """These (host) constants on a device that is slower by ``slowdown``."""
        return Constants({k: v * slowdown.arithmetic for k, v in self.per_flop.items()},
                         self.per_byte * slowdown.memory, self.per_op * slowdown.overhead)

    def to_dict(self) -> dict:
        return {"per_flop": dict(self.per_flop), "per_byte": self.per_byte, "per_op": self.per_op}

    @classmethod
    def from_dict(cls, data: dict) -> Constants:
        return cls(dict(data["per_flop"]), float(data["per_byte"]), float(data["per_op"]))


PASSES = ("forward", "input-grad", "weight-grad")
KEYS = tuple(f"{k}/{p}" for k in ARITHMETIC_KINDS for p in PASSES)


def _arithmetic(p: Phase, c: Constants) -> float:
    if p.kind not in ARITHMETIC_KINDS:
        return 0.0
    if p.phase == "forward":
        return p.flops * c.per_flop[f"{p.kind}/forward"]
    return p.flops * c.per_flop[f"{p.kind}/input-grad"] + p.weight_flops * c.per_flop[f"{p.kind}/weight-grad"]


def phase_seconds(p: Phase, c: Constants) -> float:
    """One layer phase: its arithmetic, its memory traffic, its operations."""
    return _arithmetic(p, c) + p.bytes * c.per_byte + p.ops * c.per_op


def predict(phases, c: Constants) -> float:
    """Predicted seconds of the training step made of ``phases``."""
    return sum(phase_seconds(p, c) for p in phases)


def split(phases, c: Constants) -> dict:
    """The predicted step split into arithmetic, memory traffic and per-operation overhead."""
    return {"arithmetic": sum(_arithmetic(p, c) for p in phases),
            "memory": sum(p.bytes * c.per_byte for p in phases), "overhead": sum(p.ops * c.per_op for p in phases)}


def _features(p: Phase) -> np.ndarray:
    row = np.zeros(len(KEYS) + 2)
    if p.kind in ARITHMETIC_KINDS and p.phase == "forward":
        row[KEYS.index(f"{p.kind}/forward")] = p.flops
    elif p.kind in ARITHMETIC_KINDS:
        row[KEYS.index(f"{p.kind}/input-grad")] = p.flops
        row[KEYS.index(f"{p.kind}/weight-grad")] = p.weight_flops
    row[-2], row[-1] = p.bytes, p.ops
    return row


def fit_host(phases) -> Constants:
    """Fit every constant to measured layer phases by non-negative least squares in seconds:
    the model's job is a whole step, a sum in which the long phases weigh most."""
    measured = [p for p in phases if p.seconds]
    a = np.array([_features(p) for p in measured])
    scale = a.max(axis=0)
    scale[scale == 0] = 1
    solution, _ = nnls(a / scale, np.array([p.seconds for p in measured]))
    solution /= scale
    return Constants(dict(zip(KEYS, solution[:-2].tolist())), float(solution[-2]), float(solution[-1]))


# Which of a device's three slowdowns share a cause, and so one fitted number. A CPU runs the
# arithmetic and the per-operation work (Python, dispatch) on the same cores; its memory is
# its own. A GPU does the arithmetic and the memory traffic; the operations are launched by
# the CPU beside it.
TIED = {"cpu": ("arithmetic", "overhead"), "gpu": ("arithmetic", "memory")}


def _terms(phases, host: Constants) -> dict:
    """A step's host-model seconds split into arithmetic, memory and overhead."""
    return {"arithmetic": sum(_arithmetic(p, host) for p in phases),
            "memory": sum(p.bytes for p in phases) * host.per_byte,
            "overhead": sum(p.ops for p in phases) * host.per_op}


def fit_device(host: Constants, cells: dict, processor: str) -> Slowdown:
    """A device's slowdown from whole steps ``{label: (phases, seconds)}`` measured
    there: one number for the two terms that share a cause (``TIED``), one for the
    third, by non-negative least squares in relative error."""
    tied = TIED[processor]
    free = next(t for t in Slowdown._fields if t not in tied)
    rows = []
    for phases, seconds in cells.values():
        terms = _terms(phases, host)
        both = terms[tied[0]] + terms[tied[1]]
        rows.append([both / seconds, terms[free] / seconds])
    (together, alone), _ = nnls(np.array(rows), np.ones(len(rows)))
    return Slowdown(**{tied[0]: float(together), tied[1]: float(together),
                       free: float(alone)})


def relative_errors(phases, c: Constants) -> list[float]:
    return [phase_seconds(p, c) / p.seconds - 1 for p in phases if p.seconds]


def roofline(phases, peak_flops_per_s: float, peak_bytes_per_s: float) -> float:
    """The spec-sheet roofline: every layer phase at peak arithmetic or peak bandwidth,
    whichever binds, and no overhead."""
    return sum(max((p.flops + p.weight_flops) / peak_flops_per_s, p.bytes / peak_bytes_per_s) for p in phases)


def calibrated(host_micro: dict, device_micro: dict) -> Slowdown:
    """A device's slowdown from ``run.py --calibrate`` there and on the host: the matrix
    product's rate for arithmetic, the copy's for memory, the tiny operations' for overhead."""
    return Slowdown(host_micro["matmul_flops_per_s"] / device_micro["matmul_flops_per_s"],
                    host_micro["copy_bytes_per_s"] / device_micro["copy_bytes_per_s"],
                    device_micro["op_overhead_s"] / host_micro["op_overhead_s"])



def device_constants(device: str, calibration: dict | None = None) -> Constants:
    """The fitted constants of ``device`` (``pi4``, ``nano`` or ``host``), or, given the JSON of
    ``run.py --calibrate`` on some device, constants calibrated for it."""
    from ..choices import DEVICE_NAMES, check_choice
    data = json.loads(CONSTANTS_FILE.read_text())
    host = Constants.from_dict(data["host"])
    if calibration is not None:
        missing = [k for k in ("matmul_flops_per_s", "copy_bytes_per_s", "op_overhead_s") if k not in calibration]
        if missing:
            raise ValueError(f"the calibration lacks {', '.join(missing)}: make it with run.py --calibrate --json")
        return host.on_device(calibrated(data["host_micro"], calibration))
    check_choice("device", device, DEVICE_NAMES)
    if device == "host":
        return host
    return host.on_device(Slowdown(**data["devices"][device]["slowdown"]))
