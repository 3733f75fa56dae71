"""Analytic profiler: FLOPs, parameters and training memory (the paper's "Model Profiling").

The paper's efficiency numbers come from an "analytical profiling tool" that was never
published. Ours works like TinyTL's memory profiler: ``trace`` runs one forward pass on zeros
and records every layer's shapes and which tensors carry gradients; ``count`` then applies one
rule per layer type, all written down in ``RULES`` (print them with ``rules_table``), to turn
each layer into FLOPs and bytes. ``profile`` does both.

What a layer keeps for backward, and a few units, depend on the named ``Convention``:

* ``pytorch``: what eager PyTorch with this package's operators really keeps, each storage
  counted once. It agrees with the measurement (``measure.saved_activations``).
* ``paper``: the TinyTL-style accounting the paper's numbers fit: a 1-bit mask for ReLU and for
  the sign-approximated activations, 2 bits for an exact ReLU6 (Table 2), a full map for
  Hard-Swish and Hard-Sigmoid, a BN input only when its scale trains, frozen parameters at
  8 bits, BN and activations running in place, and the input gradient of the lowest trained
  layer counted although nothing uses it. Figure 1, Figure 4 and Table 3 fit it.
* ``paper-relu6-1bit``: ``paper`` with 1 bit for an exact ReLU6, as TinyTL's profiler counts
  it. Table 1 fits it exactly (and ``paper`` within 1 %); Figure 1's MobileNetV2 row does not.

The peak is TinyTL's: the parameters, plus the largest value over layers, in forward order, of
(activations stored so far + the running layer's input and output + residual inputs held).
Gradients and optimizer state are reported apart from the peak: the paper's tables leave them
out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import partial

import torch
from torch import nn
from torchvision.models import mobilenetv2, mobilenetv3, resnet
from torchvision.models.mobilenetv3 import InvertedResidualConfig
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

from .choices import BLOCK_KINDS, CONVENTIONS, Convention  # noqa: F401 (profiler.Convention)
from .methods import LiteResidual, prepare, prepare_block
from .models import block_units, build_model, check_positive
from .ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from .quant import FrozenLayer


# ---------------------------------------------------------------------------------------------
# Conventions


def conventions_table() -> str:
    """The named conventions side by side, one row per switch (markdown)."""
    names = [f.name for f in fields(Convention) if f.name not in ("name", "summary")]
    lines = ["| switch | " + " | ".join(CONVENTIONS) + " |", "|---|" + "---|" * len(CONVENTIONS)]
    lines += [f"| {n} | " + " | ".join(str(getattr(c, n)) for c in CONVENTIONS.values()) + " |" for n in names]
    lines.append("| fits | " + " | ".join(c.summary for c in CONVENTIONS.values()) + " |")
    return "\n".join(lines)


def get_convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown convention {convention!r}; valid choices: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[convention]


# ---------------------------------------------------------------------------------------------
# The rules: one row per layer type


@dataclass
class Call:
    """One layer's forward call as the trace saw it."""

    name: str
    module: nn.Module | None
    x: torch.Tensor | None  # the layer's input
    y: torch.Tensor  # its output
    parts: dict = field(default_factory=dict)  # container rules: outputs of named children
    held: list = field(default_factory=list)  # residual inputs kept alive while the layer runs

    @property
    def x_grad(self) -> bool:
        """Does autograd send a gradient to the input (something below trains)?"""
        return self.x is not None and self.x.requires_grad

    def trains(self, param: str) -> bool:
        p = getattr(self.module, param, None)
        return isinstance(p, nn.Parameter) and p.requires_grad

    def input_gradient(self, cv: Convention) -> bool:
        """Is the input gradient computed? Under ``lowest_input_gradient`` also where unused."""
        own = () if self.module is None else self.module.parameters(recurse=False)
        return self.x_grad or (cv.lowest_input_gradient and any(p.requires_grad for p in own))


@dataclass
class Cost:
    stored: list  # (storage key, bytes, what) for each tensor kept for backward
    forward: int = 0
    backward_input: int = 0  # gradients with respect to activations
    backward_weight: int = 0  # gradients with respect to parameters


@dataclass(frozen=True)
class Rule:
    layer: str
    types: tuple
    pytorch: str  # what it keeps for backward, "pytorch" storage
    paper: str  # what it keeps for backward, "paper" storage
    forward: str
    backward: str
    cost: object  # (call, convention) -> Cost
    elementwise: bool = False  # may run in place: its transient is its input alone (TinyTL)


def _key(t):
    return t.untyped_storage().data_ptr()  # the storage: views of one tensor share it


def _full(t, what):
    return (_key(t), t.numel() * t.element_size(), what)


def _mask(t, bits, what):
    return (object(), math.ceil(t.numel() * bits / 8), what)


def _macs(m, y):
    """Multiply-accumulates: each output element takes one per weight of its filter."""
    if isinstance(m, FrozenLayer):
        weight = m.weight_int8 if m.precision == "int8" else m.weight_float
    else:
        weight = m.weight
    return y.numel() * math.prod(weight.shape[1:])  # conv: C_in/groups x k x k; linear: in_features


def _conv_linear(c, cv):
    m, macs, n_out = c.module, _macs(c.module, c.y), c.y.numel()
    weight_trains = c.trains("weight")
    if cv.storage == "pytorch":  # convolution keeps its input whenever it is in the graph
        keeps = weight_trains or (isinstance(m, nn.Conv2d) and (c.x_grad or c.trains("bias")))
    else:
        keeps = weight_trains
    return Cost([_full(c.x, "input")] if keeps else [],
                forward=cv.flops_per_mac * macs + (n_out if m.bias is not None else 0),
                backward_input=cv.flops_per_mac * macs if c.input_gradient(cv) else 0,
                backward_weight=(cv.flops_per_mac * macs if weight_trains else 0)
                + (n_out if c.trains("bias") else 0))


def _frozen_layer(c, cv):
    n_out, macs = c.y.numel(), _macs(c.module, c.y)
    return Cost([], forward=cv.flops_per_mac * macs + (n_out if c.module.bias is not None else 0),
                backward_input=cv.flops_per_mac * macs if c.input_gradient(cv) else 0,
                backward_weight=n_out if c.trains("bias") else 0)


def _batch_norm(c, cv):
    n, training = c.x.numel(), c.module.training
    in_graph = c.x_grad or c.trains("weight") or c.trains("bias")
    if cv.storage == "pytorch":
        stored = [_full(c.x, "input")] if in_graph else []
        if in_graph and training:  # batch mean and inverse std, per channel
            stored.append((object(), 2 * c.module.num_features * 4, "batch statistics"))
    else:
        stored = [_full(c.x, "input")] if c.trains("weight") else []
    return Cost(stored, forward=(8 if training else 4) * n,
                backward_input=(8 if training else 1) * n if c.input_gradient(cv) else 0,
                backward_weight=(2 * n if c.trains("weight") else 0) + (n if c.trains("bias") else 0))


def _group_norm(c, cv):
    """GroupNorm (TinyTL's patches): per-sample statistics, so it always normalizes like a training BN."""
    n, m = c.x.numel(), c.module
    in_graph = c.x_grad or c.trains("weight") or c.trains("bias")
    if cv.storage == "pytorch":
        stored = [_full(c.x, "input"), (object(), 2 * c.x.shape[0] * m.num_groups * 4, "group statistics")] \
            if in_graph else []
    else:
        stored = [_full(c.x, "input")] if c.trains("weight") else []
    return Cost(stored, forward=8 * n, backward_input=8 * n if c.input_gradient(cv) else 0,
                backward_weight=(2 * n if c.trains("weight") else 0) + (n if c.trains("bias") else 0))


def _shift_only_bn(c, cv):
    n, keeps = c.x.numel(), c.x_grad and cv.storage == "pytorch"
    stored = [(object(), c.module.num_features * c.x.element_size(), "per-channel scale")] if keeps else []
    return Cost(stored, forward=4 * n, backward_input=n if c.input_gradient(cv) else 0,
                backward_weight=n if c.trains("bias") else 0)


_EXACT = {nn.ReLU: ("output", 1, 1), nn.ReLU6: ("input", 2, 1),
          nn.Hardswish: ("input", 5, 4), nn.Hardsigmoid: ("input", 4, 2)}


def _exact_activation(c, cv):
    kind = type(c.module)
    keeps, forward, backward = _EXACT[kind]
    if not c.x_grad:
        return Cost([], forward=forward * c.x.numel())
    if cv.storage == "pytorch":
        inplace = getattr(c.module, "inplace", False)
        if keeps == "output":  # ReLU's result, shared with the next layer
            stored = [_full(c.y, "output")]
        elif inplace:  # the input is about to be overwritten: autograd keeps a copy
            stored = [_mask(c.x, 8 * c.x.element_size(), "copy of input")]
        else:
            stored = [_full(c.x, "input")]
    elif kind is nn.ReLU:
        stored = [_mask(c.x, 1, "1-bit mask")]
    elif kind is nn.ReLU6:
        stored = [_mask(c.x, cv.relu6_mask_bits, f"{cv.relu6_mask_bits}-bit mask")]
    else:
        stored = [_full(c.x, "input")]
    return Cost(stored, forward=forward * c.x.numel(), backward_input=backward * c.x.numel())


_SIGN_FORWARD = {SignReLU: 1, SignReLU6: 2, SignHardswish: 5}


def _sign_activation(c, cv):
    n = c.x.numel()
    stored = [_mask(c.x, 1, "1-bit mask")] if c.x_grad else []
    return Cost(stored, forward=_SIGN_FORWARD[type(c.module)] * n, backward_input=n if c.x_grad else 0)


def _average_pool(c, cv):
    n = c.x.numel()
    # PyTorch computes an adaptive pool to 1x1 as a mean, which keeps nothing
    global_pool = isinstance(c.module, nn.AdaptiveAvgPool2d) and c.y.shape[-1] * c.y.shape[-2] == 1
    keeps = cv.storage == "pytorch" and c.x_grad and not global_pool
    return Cost([_full(c.x, "input")] if keeps else [], forward=n, backward_input=n if c.x_grad else 0)


def _max_pool(c, cv):
    keeps = cv.storage == "pytorch" and c.x_grad
    stored = [_full(c.x, "input"), (object(), c.y.numel() * 8, "int64 indices")] if keeps else []
    return Cost(stored, forward=c.x.numel(), backward_input=c.y.numel() if c.x_grad else 0)


def _dropout(c, cv):
    n = c.x.numel()
    keeps = cv.storage == "pytorch" and c.x_grad and c.module.training and c.module.p > 0
    return Cost([_mask(c.x, cv.dropout_mask_bits, "dropout mask")] if keeps else [],
                forward=n, backward_input=n if c.x_grad else 0)


def _nothing(c, cv):
    return Cost([])


def _squeeze_excitation(c, cv):
    scale, n = c.parts["scale_activation"], c.y.numel()
    stored = [_full(c.x, "input")] if scale.requires_grad else []
    stored += [_full(scale, "scale")] if c.x_grad else []
    return Cost(stored, forward=n,
                backward_input=(n if c.x_grad else 0) + (2 * n if scale.requires_grad else 0))


def _residual_add(c, cv):
    return Cost([], forward=c.y.numel())


def _lite_residual(c, cv):
    patch, n = c.parts["patch"], c.y.numel()
    return Cost([], forward=8 * n, backward_input=7 * n if patch.requires_grad else 0)


def _functional_pool(c, cv):
    features = c.parts["features"]
    return Cost([], forward=features.numel(), backward_input=features.numel() if features.requires_grad else 0)


def _cross_entropy(c, cv):
    if cv.storage != "pytorch" or not c.x_grad:
        return Cost([])
    n = c.x.shape[0]
    return Cost([(object(), c.x.numel() * 4, "log-probabilities"), (object(), n * 8 + 4, "targets")])


RESIDUAL_BLOCKS = (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual, resnet.BasicBlock,
                   resnet.Bottleneck)

RULES = (
    Rule("Conv2d / Linear", (nn.Conv2d, nn.Linear),
         "input (Conv2d: if any gradient passes; Linear: if the weight trains)", "input, if the weight trains",
         "2 x MACs (+1 per output for a bias)",
         "input: 2 x MACs if the input needs it (paper: or the layer trains); weight: 2 x MACs", _conv_linear),
    Rule("frozen Conv2d / Linear (int8 FrozenLayer)", (FrozenLayer,), "nothing", "nothing",
         "2 x MACs", "input: 2 x MACs if a layer below trains; weight: none", _frozen_layer),
    Rule("BatchNorm2d (after prepare: scale trains)", (nn.BatchNorm2d,), "input + batch mean and 1/std",
         "input, if the scale trains", "4 per element, +4 for batch statistics",
         "input: 8 per element; scale: 2, shift: 1", _batch_norm, True),
    Rule("GroupNorm (TinyTL patches)", (nn.GroupNorm,), "input + group mean and 1/std",
         "input, if the scale trains", "8 per element", "input: 8 per element; scale: 2, shift: 1",
         _group_norm, True),
    Rule("ShiftOnlyBatchNorm2d (shift trains, or frozen)", (ShiftOnlyBatchNorm2d,), "per-channel scale (C floats)",
         "nothing", "4 per element", "input: 1 per element; shift: 1", _shift_only_bn, True),
    Rule("ReLU / ReLU6, exact", (nn.ReLU, nn.ReLU6), "ReLU: output; ReLU6: input (in place: a copy)",
         "ReLU: 1-bit mask; ReLU6: relu6_mask_bits mask (Table 2: 2 bits)", "1 (ReLU), 2 (ReLU6) per element",
         "1 per element", _exact_activation, True),
    Rule("Hard-Swish / Hard-Sigmoid, exact", (nn.Hardswish, nn.Hardsigmoid), "input (in place: a copy)", "input",
         "5 (Hard-Swish), 4 (Hard-Sigmoid) per element", "4 (Hard-Swish), 2 (Hard-Sigmoid) per element",
         _exact_activation, True),
    Rule("sign-approximated activation", (SignReLU, SignReLU6, SignHardswish), "1-bit mask, packed",
         "1-bit mask", "as the exact activation", "1 per element", _sign_activation, True),
    Rule("average pooling", (nn.AdaptiveAvgPool2d, nn.AvgPool2d), "input, unless adaptive to 1x1",
         "nothing", "1 per input element", "1 per input element", _average_pool),
    Rule("max pooling", (nn.MaxPool2d,), "input + int64 indices", "nothing", "1 per input element",
         "1 per output element", _max_pool),
    Rule("dropout (training)", (nn.Dropout,), "mask of dropout_mask_bits (CPU: a float)", "nothing", "1 per element",
         "1 per element", _dropout, True),
    Rule("identity / flatten", (nn.Identity, nn.Flatten), "nothing", "nothing", "0", "0", _nothing),
    Rule("squeeze-excitation: scale x input", (SqueezeExcitation,), "input and scale",
         "input and scale", "1 per element", "input: 1, scale: 2 per element", _squeeze_excitation),
    Rule("residual add (inverted residual, ResNet block)", RESIDUAL_BLOCKS, "nothing; input held",
         "nothing; input held", "1 per element", "0 (the gradient is passed on)", _residual_add),
    Rule("lite residual patch: upsample + add", (LiteResidual,), "nothing; input held",
         "nothing; input held", "8 per output element", "7 per output element", _lite_residual),
    Rule("MobileNetV2 global pooling (functional)", (mobilenetv2.MobileNetV2,), "nothing", "nothing",
         "1 per input element", "1 per input element", _functional_pool),
    Rule("cross-entropy loss", (), "log-probabilities + targets", "nothing", "not counted",
         "not counted", _cross_entropy),
)
LOSS_RULE = RULES[-1]


def rule_for(module: nn.Module) -> Rule | None:
    for rule in RULES:
        if rule.types and isinstance(module, rule.types):
            return rule
    return None


def rules_table(convention: str | Convention | None = None) -> str:
    """The counting rules as one markdown table (both storage columns unless one is chosen)."""
    cv = None if convention is None else get_convention(convention)
    storage = ["pytorch", "paper"] if cv is None else [cv.storage]
    heads = ["layer", *[f"kept for backward ({s})" for s in storage], "forward FLOPs", "backward FLOPs"]
    rows = [[r.layer, *[getattr(r, s) for s in storage], r.forward, r.backward] for r in RULES]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The profile


@dataclass
class LayerProfile:
    name: str
    rule: str
    input_shape: tuple
    output_shape: tuple
    params: int = 0
    params_trainable: int = 0
    param_bytes: int = 0
    forward_flops: int = 0
    backward_input_flops: int = 0
    backward_weight_flops: int = 0
    stored: str = "nothing"  # what the rule kept, e.g. "input", "1-bit mask"
    activation_bytes: int = 0
    transient_bytes: int = 0  # the layer's input and output while it runs
    residual_bytes: int = 0  # residual inputs held while it runs
    live_bytes: int = 0  # stored so far + transient + residual: the candidate for the peak

    @property
    def backward_flops(self) -> int:
        return self.backward_input_flops + self.backward_weight_flops


@dataclass
class Profile:
    layers: list
    convention: Convention
    input_shape: tuple
    uncounted: list = field(default_factory=list)  # leaf modules no rule covers

    def _sum(self, attr):
        return sum(getattr(layer, attr) for layer in self.layers)

    @property
    def params_total(self) -> int:
        return self._sum("params")

    @property
    def params_trainable(self) -> int:
        return self._sum("params_trainable")

    @property
    def params_frozen(self) -> int:
        return self.params_total - self.params_trainable

    @property
    def param_bytes(self) -> int:
        return self._sum("param_bytes")

    @property
    def forward_flops(self) -> int:
        return self._sum("forward_flops")

    @property
    def backward_input_flops(self) -> int:
        return self._sum("backward_input_flops")

    @property
    def backward_weight_flops(self) -> int:
        return self._sum("backward_weight_flops")

    @property
    def backward_flops(self) -> int:
        return self.backward_input_flops + self.backward_weight_flops

    @property
    def training_flops(self) -> int:
        return self.forward_flops + self.backward_flops

    @property
    def activation_bytes(self) -> int:
        return self._sum("activation_bytes")

    @property
    def peak_activation_bytes(self) -> int:
        return max((layer.live_bytes for layer in self.layers), default=0)

    @property
    def peak_bytes(self) -> int:
        """Parameters + the activation peak: the paper's "memory footprint" (gradients left out)."""
        return self.param_bytes + self.peak_activation_bytes

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params_trainable

    @property
    def optimizer_state_bytes(self) -> int:
        return 8 * self.params_trainable  # Adam: two float32 moments per trainable parameter

    def mb(self, n_bytes: int) -> float:
        return n_bytes / self.convention.bytes_per_mb

    def to_dict(self, layers: bool = True) -> dict:
        keys = ("params_total", "params_trainable", "params_frozen", "param_bytes", "forward_flops",
                "backward_flops", "backward_input_flops", "backward_weight_flops", "training_flops",
                "activation_bytes", "peak_activation_bytes", "peak_bytes", "gradient_bytes",
                "optimizer_state_bytes")
        report = {"convention": self.convention.name, "input_shape": list(self.input_shape),
                  "bytes_per_mb": self.convention.bytes_per_mb}
        report.update({k: getattr(self, k) for k in keys})
        if layers:
            report["layers"] = [{**vars(layer), "input_shape": list(layer.input_shape),
                                 "output_shape": list(layer.output_shape)} for layer in self.layers]
        if self.uncounted:
            report["uncounted"] = list(self.uncounted)
        return report

    def table(self) -> str:
        """A readable per-layer table followed by the totals."""
        mb = self.mb
        kept = max([len("kept for backward"), *(len(layer.stored) for layer in self.layers)]) + 1
        head = (f"{'layer':<32}{'kept for backward':<{kept}}{'fwd MFLOPs':>11}{'bwd MFLOPs':>11}"
                f"{'trainable':>11}{'stored MB':>11}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            lines.append(f"{layer.name[:31]:<32}{layer.stored:<{kept}}{layer.forward_flops / 1e6:>11.2f}"
                         f"{layer.backward_flops / 1e6:>11.2f}{layer.params_trainable:>11,}"
                         f"{mb(layer.activation_bytes):>11.3f}")
        lines.append("-" * len(head))
        lines += [
            f"convention {self.convention.name!r}, input {tuple(self.input_shape)}, MB = {self.convention.bytes_per_mb:,} bytes",
            f"parameters      {self.params_total:,} ({self.params_trainable:,} trainable, "
            f"{self.params_frozen:,} frozen), {mb(self.param_bytes):.3f} MB as stored",
            f"FLOPs (M)       forward {self.forward_flops / 1e6:.2f}, backward {self.backward_flops / 1e6:.2f} "
            f"(input gradients {self.backward_input_flops / 1e6:.2f}, weight gradients "
            f"{self.backward_weight_flops / 1e6:.2f})",
            f"activations     {mb(self.activation_bytes):.3f} MB stored for backward",
            f"peak            {mb(self.peak_bytes):.3f} MB (parameters + activation peak "
            f"{mb(self.peak_activation_bytes):.3f})",
            f"not in the peak gradients {mb(self.gradient_bytes):.3f} MB, Adam state "
            f"{mb(self.optimizer_state_bytes):.3f} MB",
        ]
        if self.uncounted:
            lines.append(f"no rule for (not counted): {', '.join(self.uncounted)}")
        return "\n".join(lines)


def _param_counts(module: nn.Module, cv: Convention):
    """(total, trainable, bytes) of the parameters a module owns itself; FrozenLayer weights count."""
    total = trainable = n_bytes = 0
    for p in module.parameters(recurse=False):
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            n_bytes += 4 * p.numel()
        else:
            n_bytes += _frozen_bytes(p, cv)
    if isinstance(module, FrozenLayer):
        weight = module.weight_int8 if module.precision == "int8" else module.weight_float
        total += weight.numel()
        n_bytes += _frozen_bytes(weight, cv)
        if module.precision == "int8" and cv.frozen_param_bits is None:
            n_bytes += module.weight_scale.numel() * 4
    return total, trainable, n_bytes


def _frozen_bytes(t, cv):
    if cv.frozen_param_bits is None:
        return t.numel() * t.element_size()
    return math.ceil(t.numel() * cv.frozen_param_bits / 8)


@dataclass
class Trace:
    """What one forward pass showed: every counted layer call, in forward order."""

    calls: list
    input_shape: tuple
    uncounted: list  # leaf modules that no rule covers


def trace(model: nn.Module, input_shape=(8, 3, 224, 224), *, loss: bool = True,
          input_requires_grad: bool = False) -> Trace:
    """Run ``model`` once on zeros, as TinyTL's profiler does, and record its layer calls.

    ``loss``: a cross-entropy loss follows the output (the measured training step has one).
    ``input_requires_grad``: the input carries a gradient (a block inside a trained region).
    The model's BatchNorm statistics and the random number generator are left as they were.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 4 or not all(isinstance(s, int) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be four positive integers (N, C, H, W), got {input_shape}")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    x = torch.zeros(input_shape, device=device).requires_grad_(input_requires_grad)
    calls, outputs, held, uncounted, handles = [], {}, [], [], []
    names = {m: n for n, m in model.named_modules()}

    def pre(module, args):
        if _holds_residual(module):
            held.append((module, args[0]))

    def post(module, args, output):
        name, leaf = names[module] or "(model)", next(module.children(), None) is None
        outputs[names[module]] = output
        rule = rule_for(module)
        if rule is not None and (leaf or _holds_residual(module) or not isinstance(module, RESIDUAL_BLOCKS)):
            parts = {child: outputs.get(f"{names[module]}.{child}".lstrip("."))
                     for child in ("scale_activation", "patch", "features")}
            calls.append(Call(name, module, args[0] if args else None, output, parts, [t for _, t in held]))
        elif rule is None and leaf:
            uncounted.append(f"{name} ({type(module).__name__})")
        if held and held[-1][0] is module:
            held.pop()

    statistics = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in statistics]  # BatchNorm statistics move in train mode: put them back
    for module in model.modules():
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws
            y = model(x)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, old in zip(statistics, saved):
                b.copy_(old)
    if loss:
        calls.append(Call("loss", None, y, y))
    return Trace(calls, input_shape, uncounted)


def _holds_residual(module) -> bool:
    """Blocks that keep their input alive for a skip connection while their body runs."""
    if isinstance(module, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
        return module.use_res_connect
    return isinstance(module, (resnet.BasicBlock, resnet.Bottleneck, LiteResidual))


def count(traced: Trace, convention: str | Convention = "pytorch") -> Profile:
    """Apply the RULES of ``convention`` to a trace: per-layer FLOPs, parameters and bytes."""
    cv = get_convention(convention)
    layers, stored_keys, stored_so_far, counted = [], set(), 0, set()
    for call in traced.calls:
        rule = LOSS_RULE if call.module is None else rule_for(call.module)
        cost = rule.cost(call, cv)
        kept, what = 0, []
        for key, n_bytes, label in cost.stored:
            if key not in stored_keys:  # pytorch: a storage kept by two layers counts once, first
                if cv.storage == "pytorch":  # paper: every layer counts what it keeps, as TinyTL
                    stored_keys.add(key)
                kept += n_bytes
                what.append(label)
        in_place = rule.elementwise and cv.elementwise_in_place
        io = {}
        for t in (call.x,) if in_place else (call.x, call.y):
            if isinstance(t, torch.Tensor):
                io.setdefault(_key(t), t.numel() * t.element_size())
        held = {_key(t): t.numel() * t.element_size() for t in call.held}
        residual = sum(v for k, v in held.items() if k not in io and k not in stored_keys)
        params = (0, 0, 0)
        if call.module is not None and call.module not in counted:  # a module called twice owns its
            counted.add(call.module)  # parameters once
            params = _param_counts(call.module, cv)
        transient = sum(io.values())
        layers.append(LayerProfile(
            name=call.name, rule=rule.layer, input_shape=tuple(call.x.shape), output_shape=tuple(call.y.shape),
            params=params[0], params_trainable=params[1], param_bytes=params[2],
            forward_flops=cost.forward, backward_input_flops=cost.backward_input,
            backward_weight_flops=cost.backward_weight, stored=" + ".join(what) or "nothing",
            activation_bytes=kept, transient_bytes=transient, residual_bytes=residual,
            live_bytes=stored_so_far + transient + residual))
        stored_so_far += kept
    return Profile(layers, cv, traced.input_shape, traced.uncounted)


def profile(model: nn.Module, input_shape=(8, 3, 224, 224), *, convention: str | Convention = "pytorch",
            loss: bool = True, input_requires_grad: bool = False) -> Profile:
    """Profile one training step of ``model`` (prepared or not) on inputs of ``input_shape``."""
    cv = get_convention(convention)  # a bad name fails before the forward pass
    return count(trace(model, input_shape, loss=loss, input_requires_grad=input_requires_grad), cv)


# ---------------------------------------------------------------------------------------------
# Models and single blocks


def profile_model(model: str | nn.Module, method: str, blocks: int | None = None, *, batch: int = 8,
                  resolution: int = 224, classes: int = 10, convention: str | Convention = "pytorch",
                  frozen_precision: str = "int8", optimize_bottom: bool = False) -> Profile:
    """``prepare`` a model for ``method`` and profile one training step at batch x 3 x res x res.

    By default the frozen bottom keeps its BNs, as the paper counts the network;
    ``optimize_bottom=True`` profiles what ``prepare`` runs by default (BNs folded into the convs).
    """
    check_positive(batch=batch, resolution=resolution, classes=classes)
    prepared = prepare(model, method, blocks, num_classes=classes, frozen_precision=frozen_precision,
                       optimize_bottom=optimize_bottom, resolution=resolution)
    return profile(prepared.model, (batch, 3, resolution, resolution), convention=convention)


def build_block(kind: str, channels: int = 96, expansion: int = 1, kernel: int = 5) -> nn.Module:
    """One block of Table 1 / Figure 1, input and output ``channels`` wide, stride 1.

    ``conv``: kxk conv + BN + ReLU. ``mbv2``: MobileNetV2 inverted residual (ReLU6).
    ``mbv3``: MobileNetV3 inverted residual with squeeze-excitation and Hard-Swish. The
    inverted residuals keep their 1x1 expansion conv even at expansion 1, as Table 1 counts it.
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"unknown block {kind!r}; valid choices: {', '.join(BLOCK_KINDS)}")
    check_positive(channels=channels, expansion=expansion, kernel=kernel)
    if kernel % 2 == 0:
        raise ValueError(f"kernel must be odd (same padding), got {kernel}")
    if kind == "conv":
        return Conv2dNormActivation(channels, channels, kernel, activation_layer=nn.ReLU)
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    config = InvertedResidualConfig(channels, kernel, channels * expansion, channels, use_se=kind == "mbv3",
                                    activation="HS" if kind == "mbv3" else "RE", stride=1, dilation=1,
                                    width_mult=1.0)
    block = mobilenetv3.InvertedResidual(config, norm_layer=norm)
    activation = nn.Hardswish if kind == "mbv3" else nn.ReLU6
    if expansion == 1:
        expand = Conv2dNormActivation(channels, channels, 1, norm_layer=norm, activation_layer=activation)
        block.block = nn.Sequential(expand, *block.block)
    if kind == "mbv2":
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is nn.ReLU:
                    setattr(parent, name, nn.ReLU6(inplace=True))  # as torchvision's MobileNetV2
    return block


def profile_block(kind: str, method: str = "ft-blocks", input_shape=(8, 96, 7, 7), *, expansion: int = 1,
                  kernel: int = 5, convention: str | Convention = "pytorch",
                  frozen_precision: str = "int8") -> Profile:
    """Profile one block trained as ``method`` would train it, inside a trained region."""
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 4:
        raise ValueError(f"input_shape must be four sizes N,C,H,W, got {input_shape}")
    block = prepare_block(build_block(kind, input_shape[1], expansion, kernel), method, frozen_precision)
    return profile(block, input_shape, convention=convention, loss=False, input_requires_grad=True)


def finetuning_sweep(model: str, method: str = "ft-blocks", *, batch: int = 8, resolution: int = 224,
                     classes: int = 10, convention: str | Convention = "pytorch") -> dict:
    """Figure 4: ``{label: Profile}`` for FT-Last, FT-1..N-BLKs (``method``) and FT-All."""
    n_blocks = len(block_units(build_model(model, classes)))
    sweep = {"FT-Last": profile_model(model, "ft-last", batch=batch, resolution=resolution, classes=classes,
                                      convention=convention)}
    for k in range(1, n_blocks + 1):
        sweep[f"FT-{k}-BLKs"] = profile_model(model, method, k, batch=batch, resolution=resolution,
                                             classes=classes, convention=convention)
    sweep["FT-All"] = profile_model(model, "ft-all", batch=batch, resolution=resolution, classes=classes,
                                    convention=convention)
    return sweep


# ---------------------------------------------------------------------------------------------
# The paper's numbers, and ours beside them


@dataclass(frozen=True)
class PaperCheck:
    """One reported number, ours under one convention, and the agreement the issue asks for."""

    source: str  # where the paper reports it
    quantity: str
    reported: float
    ours: float
    convention: str
    tolerance: float  # relative, or percentage points when ``points``
    points: bool = False
    required: bool = True  # False: shown for information (an uncertain row, another reading)

    @property
    def error(self) -> float:
        return self.ours - self.reported if self.points else (self.ours - self.reported) / self.reported

    @property
    def ok(self) -> bool:
        return abs(self.error) <= self.tolerance + 1e-12


# Chiang et al. 2023, as decoded in shared/paper/NOTES.md. FLOPs in millions, memory in MB (1e6 bytes).
REPORTED = {
    "table1": {"conv": (230_592, 541.67, 0.306), "mbv2": (21_408, 51.56, 0.913),
               "mbv3": (26_136, 52.91, 1.362)},  # params, forward+backward MFLOPs, stored MB
    "figure1": {"mbv2": 46.3, "mbv3": 53.3},  # % fewer stored activations, expansion 6
    "figure4": (1000.6, 1934.92, 129.7),  # MobileNetV3-Small FT-All: forward, backward MFLOPs, stored MB
    "table3": {"ft-all": (382.7, 16_205.0, 2_927_612), "ft-bn": (189.9, 11_066.1, 162_596),
               "ft-bias": (30.6, 10_446.5, 145_348), "ft-last": (29.0, 5_325.9, 128_100),
               "mobiletl": (40.5, 7_728.0, 1_695_972)},  # peak MB, MFLOPs, trainable parameters
    "abstract_flops_saving": 36.0,  # % fewer FLOPs fine-tuning 5 blocks of MobileNetV3
    "table6": {"nano": {"ft-all": 0.235, "ft-bn": 0.138, "ft-bias": 0.130, "mobiletl": 0.114},
               "pi": {"ft-all": 2.465, "ft-bn": 1.894, "ft-bias": 1.818, "mobiletl": 1.344}},  # s per step
}


def paper_checks(conventions=tuple(CONVENTIONS)) -> list[PaperCheck]:
    """Every reproducible number of the paper, ours under each convention (about a minute on a CPU)."""
    cvs = [get_convention(c) for c in conventions]
    rows = []

    def add(source, quantity, reported, values, tolerance, points=False, required=True):
        rows.extend(PaperCheck(source, quantity, reported, value, cv.name, tolerance, points, required)
                    for cv, value in zip(cvs, values))

    for kind, (params, flops, stored) in REPORTED["table1"].items():
        block = prepare_block(build_block(kind, 96, 1, 5), "ft-blocks")
        profiles = [count(trace(block, (8, 96, 7, 7), loss=False, input_requires_grad=True), cv) for cv in cvs]
        add("Table 1", f"{kind} parameters", params, [p.params_total for p in profiles], 0)
        add("Table 1", f"{kind} FLOPs (M)", flops, [p.training_flops / 1e6 for p in profiles], 0.05)
        add("Table 1", f"{kind} stored activations (MB)", stored, [p.mb(p.activation_bytes) for p in profiles], 0.01)
    for kind, reduction in REPORTED["figure1"].items():
        stored = {}
        for method in ("ft-blocks", "mobiletl"):
            block = prepare_block(build_block(kind, 96, 6, 5), method)
            traced = trace(block, (8, 96, 7, 7), loss=False, input_requires_grad=True)
            stored[method] = [count(traced, cv).activation_bytes for cv in cvs]
        add("Figure 1", f"{kind} stored activations saved (%)", reduction,
            [100 * (1 - m / v) for v, m in zip(stored["ft-blocks"], stored["mobiletl"])], 0.3, points=True)
    traced = trace(_paper_network("mobilenet_v3_small", "ft-all", None, 10), (8, 3, 224, 224))
    profiles = [count(traced, cv) for cv in cvs]
    forward, backward, stored = REPORTED["figure4"]
    add("Figure 4", "MobileNetV3-Small FT-All forward MFLOPs", forward, [p.forward_flops / 1e6 for p in profiles], 0.03)
    add("Figure 4", "MobileNetV3-Small FT-All backward MFLOPs", backward,
        [p.backward_flops / 1e6 for p in profiles], 0.03)
    add("Figure 4", "MobileNetV3-Small FT-All stored MB", stored, [p.mb(p.activation_bytes) for p in profiles], 0.03)
    for method, (memory, flops, trainable) in REPORTED["table3"].items():
        blocks, required = (3, False) if method == "mobiletl" else (None, True)
        model = _paper_network("proxyless_mobile", method, blocks, 100)
        profiles = [count(trace(model, (8, 3, 224, 224)), cv) for cv in cvs]
        label = f"Proxyless-Mobile {method}" + (" 3 blocks" if blocks else "")
        add("Table 3", f"{label} memory (MB)", memory, [p.mb(p.peak_bytes) for p in profiles], 0.05, required=required)
        add("Table 3", f"{label} MFLOPs", flops, [p.training_flops / 1e6 for p in profiles], 0.05, required=required)
        add("Table 3", f"{label} trainable parameters", trainable, [p.params_trainable for p in profiles], 0.05,
            required=required)
    for name in ("mobilenet_v3_small", "mobilenet_v3_large"):
        full = [count(trace(_paper_network(name, "ft-all", None, 10), (8, 3, 224, 224)), cv) for cv in cvs]
        for method in ("ft-blocks", "mobiletl"):
            traced = trace(_paper_network(name, method, 5, 10), (8, 3, 224, 224))
            add("Abstract", f"{name} {method} 5 blocks: FLOPs saved vs FT-All (%)", REPORTED["abstract_flops_saving"],
                [100 * (1 - count(traced, cv).training_flops / f.training_flops) for cv, f in zip(cvs, full)],
                1.0, points=True, required=name == "mobilenet_v3_small" and method == "ft-blocks")
    return rows


def _paper_network(name: str, method: str, blocks, classes: int) -> nn.Module:
    """The network as the paper counts it: the frozen bottom keeps its BNs (see ``profile_model``)."""
    return prepare(name, method, blocks, num_classes=classes, optimize_bottom=False).model


def paper_table(rows: list[PaperCheck]) -> str:
    """The checks as a markdown table, one row per reported number and one column per convention."""
    conventions = list(dict.fromkeys(r.convention for r in rows))
    grouped = {}
    for r in rows:
        grouped.setdefault((r.source, r.quantity), {})[r.convention] = r
    lines = ["| source | quantity | reported | " + " | ".join(conventions) + " |",
             "|---|---|---:|" + "---:|" * len(conventions)]
    for (source, quantity), by_cv in grouped.items():
        cells = []
        for cv in conventions:
            r = by_cv[cv]
            err = f"{r.error:+.2f} pt" if r.points else f"{100 * r.error:+.2f}%"
            cells.append(f"{_number(r.ours)} ({err}){'' if r.ok else ' ✗'}")
        first = next(iter(by_cv.values()))
        mark = "" if first.required else " (info)"
        lines.append(f"| {source} | {quantity}{mark} | {_number(first.reported)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(x: float) -> str:
    if float(x).is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:,.2f}" if abs(x) >= 1000 else f"{x:.5g}"
