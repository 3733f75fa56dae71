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

Two peaks, named apart. ``paper_peak_bytes`` is TinyTL's, as the paper's tables count it: the
parameters, plus the largest value over layers, in forward order, of (activations stored so far
+ the running layer's input and output + residual inputs held); gradients and optimizer state
are left out. ``training_peak`` (``pytorch`` storage) is what a device must fit: the step run
phase by phase (frozen-bottom forward, trained forward, backward, Adam's step) with every
tensor alive at each moment, each layer's temporaries taken from what PyTorch's CPU kernels
allocate (the memory columns of ``RULES``, and ``STEP_RULES``). It agrees with torch's own
count of a warm step (``measure.tensor_step``); ``largest_batch`` turns it into what fits.
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
from .methods import (LiteResidual, _contiguous_output, bottom_chunk, chunked_units, prepare, prepare_block,
                      set_bottom_chunk)
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
    enclosing: list = field(default_factory=list)  # (module, input) of every module running around it
    in_place: bool = False  # a residual add that wrote into its body's output

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
    memory: object = None  # (call, threads) -> (forward moments, backward moments): the training peak
    forward_memory: str = ""  # what the layer allocates forward (the training peak)
    backward_memory: str = ""  # what it allocates backward


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


# What lives while a layer runs (the training peak): each function gives the moments of the
# layer's forward and of its backward as (bytes that scale with the batch, bytes that do not),
# counting what the layer allocates on top of what was alive when it started: its output, its
# input's gradient, its parameters' gradients and its temporaries. The shapes come from the
# trace; which kernel runs, and what it allocates, from PyTorch's CPU code (aten/native).


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _channels_last(t) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _conv_geometry(m):
    """(weight shape, stride, dilation, groups) of a Conv2d or a frozen conv."""
    if isinstance(m, FrozenLayer):
        a = m.conv_args
        weight = m.weight_int8 if m.precision == "int8" else m.weight_float
        return weight.shape, a["stride"], a["dilation"], a["groups"]
    return m.weight.shape, m.stride, m.dilation, m.groups


ONEDNN_MIN_BLOCKED_CHANNELS = 8  # oneDNN keeps an input with fewer channels in its plain layout (AVX2)


def conv_kernel(x: torch.Tensor, m: nn.Module, threads: int) -> str:
    """Which CPU convolution PyTorch runs for ``m`` on ``x`` (aten's ``ConvParams::use_mkldnn``):
    ``onednn``, ``native-1x1`` (a matrix product on the input as it is) or ``native-im2col``."""
    weight, stride, dilation, groups = _conv_geometry(m)
    n, c, h, w = x.shape
    kh, kw = weight[-2:]
    one_by_one = (kh, kw) == (1, 1)
    strided, dilated = any(s != 1 for s in stride), any(d != 1 for d in dilation)
    if ((strided or dilated or n >= 16 or not one_by_one or threads > 1)
            and (groups > 1 or (kh > 3 and kw > 3) or n > 1 or n * c * h * w > 20480)):
        return "onednn"
    return "native-1x1" if one_by_one and not strided else "native-im2col"


def _conv_moments(c, threads: int, weight_bytes: int):
    """Forward moments of a convolution with a float weight of ``weight_bytes``. A channels-last
    input makes PyTorch copy a k x k weight to channels-last too. oneDNN on the default layout
    reorders the input (when it has at least ONEDNN_MIN_BLOCKED_CHANNELS channels) and the weight
    into blocked copies, writes a blocked output and copies it out; on channels-last maps it
    reorders only the weight."""
    x, y = c.x, c.y
    kind = conv_kernel(x, c.module, threads)
    shape = _conv_geometry(c.module)[0]
    if _channels_last(y):
        weight_copy = weight_bytes if shape[1] > 1 and shape[-1] * shape[-2] > 1 else 0
        reorder = weight_bytes if kind == "onednn" else 0
        columns = _columns(c) if kind == "native-im2col" else 0
        return [(_nbytes(y) + columns, weight_copy + reorder)]
    if kind == "onednn":
        x_r = _nbytes(x) if x.shape[1] >= ONEDNN_MIN_BLOCKED_CHANNELS else 0
        return [(x_r + _nbytes(y), weight_bytes), (2 * _nbytes(y), 0)]
    if kind == "native-im2col":
        return [(_columns(c) + _nbytes(y), 0)]
    return [(_nbytes(y), 0)]


def _columns(c) -> int:
    """The im2col buffer of PyTorch's own convolution: C_in x k x k values per output position."""
    weight, _, _, _ = _conv_geometry(c.module)
    return c.y.shape[0] * c.y.shape[2] * c.y.shape[3] * math.prod(weight[1:]) * c.y.element_size()


def _conv_input_gradient(c, threads: int, weight_bytes: int):
    """Backward moments of the input gradient: oneDNN reorders the output gradient and the weight,
    computes a blocked input gradient and copies it out."""
    kind, gx = conv_kernel(c.x, c.module, threads), _nbytes(c.x)
    blocked = gx if c.x.shape[1] >= ONEDNN_MIN_BLOCKED_CHANNELS else 0
    if kind == "onednn":
        return [(_nbytes(c.y) + blocked, weight_bytes), (gx + blocked, 0)]
    return [(gx + (_columns(c) if kind == "native-im2col" else 0), 0)]


def _conv_linear_memory(c, threads):
    m, w = c.module, _nbytes(c.module.weight)
    gx = _nbytes(c.x) if c.x_grad else 0
    bias = _nbytes(m.bias) if c.trains("bias") else 0
    if isinstance(m, nn.Linear):
        return [(_nbytes(c.y), 0)], [(gx, w + bias)]
    forward = _conv_moments(c, threads, w)
    backward = _conv_input_gradient(c, threads, w) if c.x_grad else []
    kind = conv_kernel(c.x, m, threads)
    if kind == "onednn" and (c.x.shape[-2] < m.kernel_size[0] or c.x.shape[-1] < m.kernel_size[1]):
        # a kernel larger than the map: oneDNN's GEMM-based weight gradient, with per-thread
        # buffers of four weights and one sample's im2col (measured on torch 2.x, oneDNN 3.x)
        per_thread = 4 * w + _columns(c) // (c.x.shape[0] * m.groups)
        backward += [(gx, w + bias + threads * per_thread), (gx, 2 * w + bias)]
    elif kind == "onednn":  # the weight gradient: output gradient and input reordered, blocked result
        x_r = _nbytes(c.x) if c.x.shape[1] >= ONEDNN_MIN_BLOCKED_CHANNELS else 0
        backward += [(gx + _nbytes(c.y) + x_r, w + bias), (gx, 2 * w + bias)]
    else:
        backward += [(gx + (_columns(c) if kind == "native-im2col" else 0), w + bias)]
    return forward, backward


def _frozen_layer_memory(c, threads):
    """Dequantizing an int8 weight makes two float copies (``q.float()``, then ``* scale``), one
    of which lives through the product; a channels-last conv first copies a default-layout input."""
    m = c.module
    float_weight = 4 * (m.weight_int8 if m.precision == "int8" else m.weight_float).numel()
    dequantized = float_weight if m.precision == "int8" else 0
    copy = _nbytes(c.x) if m.channels_last and c.x.dim() == 4 and not _channels_last(c.x) and \
        not c.x.is_contiguous(memory_format=torch.channels_last) else 0
    forward = [(copy, 2 * dequantized)]
    if m.conv_args is None:
        forward.append((_nbytes(c.y), dequantized))
    else:
        forward += [(copy + b, f + dequantized) for b, f in _conv_moments(c, threads, float_weight)]
    backward = []
    if c.x_grad:
        backward.append((0, 2 * dequantized))
        if m.conv_args is None:
            backward.append((_nbytes(c.x), dequantized))
        else:
            backward += [(b, f + dequantized) for b, f in _conv_input_gradient(c, threads, float_weight)]
    if c.trains("bias"):
        backward.append((_nbytes(c.x) if c.x_grad else 0, _nbytes(m.bias)))
    return forward, backward


def _in_graph(c) -> bool:
    return c.x_grad or any(p.requires_grad for p in c.module.parameters(recurse=False))


def _batch_norm_memory(c, threads):
    statistics = 2 * c.module.num_features * 4
    grads = sum(_nbytes(p) for p in c.module.parameters(recurse=False) if p.requires_grad)
    if not _in_graph(c):
        return [(_nbytes(c.y), 0)], []
    return [(_nbytes(c.y), statistics)], [(2 * _nbytes(c.x) if c.x_grad else _nbytes(c.x), grads)]


def _group_norm_memory(c, threads):
    statistics = 2 * c.x.shape[0] * c.module.num_groups * 4
    grads = sum(_nbytes(p) for p in c.module.parameters(recurse=False) if p.requires_grad)
    if not _in_graph(c):
        return [(_nbytes(c.y), statistics)], []
    per_channel = 2 * c.x.shape[0] * c.module.num_channels * 4  # two N x C sums of the backward
    return [(_nbytes(c.y), statistics)], [(_nbytes(c.x) if c.x_grad else 0, grads + per_channel)]


def _shift_only_bn_memory(c, threads):
    if not _in_graph(c):
        return [(_nbytes(c.y), 0)], []  # torch's fused eval-mode kernel
    shift = _nbytes(c.module.bias) if c.trains("bias") else 0
    return [(_nbytes(c.x) + _nbytes(c.y), 0)], [(_nbytes(c.x) if c.x_grad else 0, shift)]


def _activation_memory(c, threads):
    in_place = c.y.untyped_storage().data_ptr() == c.x.untyped_storage().data_ptr()
    forward = [(0 if in_place else _nbytes(c.y), 0)]
    return forward, ([(_nbytes(c.x), 0)] if c.x_grad else [])


def _sign_activation_memory(c, threads):
    """Packing: a bool map, and an int64 product and shift of it, one byte per element each;
    unpacking: two byte-per-element maps, then the float copy of the bits times the gradient."""
    if not c.x_grad:
        return [(_nbytes(c.y), 0)], []
    n = c.x.numel()
    return [(3 * n, 0), (_nbytes(c.y), 0)], [(2 * n, 0), (n + 2 * _nbytes(c.x), 0)]


def _output_only_memory(c, threads):
    """A new output forward; the input's gradient backward (pooling, dropout)."""
    backward = [(_nbytes(c.x), 0)] if c.x_grad else []
    if isinstance(c.module, nn.Dropout) and c.module.training and c.module.p > 0 and not c.x_grad:
        return [(_nbytes(c.x) + _nbytes(c.y), 0)], backward  # no graph: a float mask, then the product
    return [(_nbytes(c.y), 0)], backward


def _no_memory(c, threads):
    return [], []


def _squeeze_excitation_memory(c, threads):
    """Backward: the scale's gradient is (gradient x input) summed per channel, the input's is
    gradient x scale: two input-sized maps."""
    scale = c.parts["scale_activation"]
    temp = _nbytes(c.x) if scale.requires_grad else 0
    return [(_nbytes(c.y), 0)], [(temp + (_nbytes(c.x) if c.x_grad else 0), _nbytes(scale))]


def _residual_add_memory(c, threads):
    """``result += input`` (MobileNetV3, ResNet) adds in place; MobileNetV2's ``x + conv(x)`` does not.
    Backward passes the gradient on to both branches: the same tensor, nothing new."""
    return [(0 if c.in_place else _nbytes(c.y), 0)], []


def _lite_residual_memory(c, threads):
    patch = c.parts["patch"]
    return [(2 * _nbytes(c.y), 0)], [(_nbytes(patch), 0)] if patch.requires_grad else []


def _functional_pool_memory(c, threads):
    features = c.parts["features"]
    pooled = features.shape[0] * features.shape[1] * features.element_size()
    return [(pooled, 0)], [(_nbytes(features), 0)] if features.requires_grad else []


def _cross_entropy_memory(c, threads):
    return [(0, 4)], [(2 * _nbytes(c.x), 0)] if c.x_grad else []


RESIDUAL_BLOCKS = (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual, resnet.BasicBlock,
                   resnet.Bottleneck)

RULES = (
    Rule("Conv2d / Linear", (nn.Conv2d, nn.Linear),
         "input (Conv2d: if any gradient passes; Linear: if the weight trains)", "input, if the weight trains",
         "2 x MACs (+1 per output for a bias)",
         "input: 2 x MACs if the input needs it (paper: or the layer trains); weight: 2 x MACs", _conv_linear,
         memory=_conv_linear_memory,
         forward_memory="output; oneDNN: blocked copies of input, weight and output first",
         backward_memory="input and weight gradients; oneDNN: blocked copies of both gradients, "
                         "the output gradient and the input"),
    Rule("frozen Conv2d / Linear (int8 FrozenLayer)", (FrozenLayer,), "nothing", "nothing",
         "2 x MACs", "input: 2 x MACs if a layer below trains; weight: none", _frozen_layer,
         memory=_frozen_layer_memory,
         forward_memory="two float copies of the int8 weight; a channels-last copy of the input; "
                        "then as a conv",
         backward_memory="the float weight again; the input gradient as a conv's"),
    Rule("BatchNorm2d (after prepare: scale trains)", (nn.BatchNorm2d,), "input + batch mean and 1/std",
         "input, if the scale trains", "4 per element, +4 for batch statistics",
         "input: 8 per element; scale: 2, shift: 1", _batch_norm, True, memory=_batch_norm_memory,
         forward_memory="output + batch statistics", backward_memory="input gradient + one input-sized temporary"),
    Rule("GroupNorm (TinyTL's patches)", (nn.GroupNorm,), "input + group mean and 1/std",
         "input, if the scale trains", "8 per element", "input: 8 per element; scale: 2, shift: 1", _group_norm,
         True, memory=_group_norm_memory, forward_memory="output + group statistics",
         backward_memory="input gradient + two N x C sums"),
    Rule("ShiftOnlyBatchNorm2d (shift trains, or frozen)", (ShiftOnlyBatchNorm2d,), "per-channel scale (C floats)",
         "nothing", "4 per element", "input: 1 per element; shift: 1", _shift_only_bn, True,
         memory=_shift_only_bn_memory, forward_memory="x * scale, then the output (frozen bottom: the output)",
         backward_memory="input gradient (gradient x scale)"),
    Rule("ReLU / ReLU6, exact", (nn.ReLU, nn.ReLU6), "ReLU: output; ReLU6: input (in place: a copy)",
         "ReLU: 1-bit mask; ReLU6: relu6_mask_bits mask (Table 2: 2 bits)", "1 (ReLU), 2 (ReLU6) per element",
         "1 per element", _exact_activation, True, memory=_activation_memory,
         forward_memory="output, unless in place", backward_memory="input gradient"),
    Rule("Hard-Swish / Hard-Sigmoid, exact", (nn.Hardswish, nn.Hardsigmoid), "input (in place: a copy)", "input",
         "5 (Hard-Swish), 4 (Hard-Sigmoid) per element", "4 (Hard-Swish), 2 (Hard-Sigmoid) per element",
         _exact_activation, True, memory=_activation_memory,
         forward_memory="output, unless in place", backward_memory="input gradient"),
    Rule("sign-approximated activation", (SignReLU, SignReLU6, SignHardswish), "1-bit mask, packed",
         "1-bit mask", "as the exact activation", "1 per element", _sign_activation, True,
         memory=_sign_activation_memory, forward_memory="3 bytes per element to pack the mask; the output",
         backward_memory="2 bytes per element to unpack; a float copy of the mask; the input gradient"),
    Rule("average pooling", (nn.AdaptiveAvgPool2d, nn.AvgPool2d), "input, unless adaptive to 1x1",
         "nothing", "1 per input element", "1 per input element", _average_pool, memory=_output_only_memory,
         forward_memory="output", backward_memory="input gradient"),
    Rule("max pooling", (nn.MaxPool2d,), "input + int64 indices", "nothing", "1 per input element",
         "1 per output element", _max_pool, memory=_output_only_memory,
         forward_memory="output", backward_memory="input gradient"),
    Rule("dropout (training)", (nn.Dropout,), "mask of dropout_mask_bits (CPU: a float)", "nothing", "1 per element",
         "1 per element", _dropout, True, memory=_output_only_memory,
         forward_memory="output (frozen: and a float mask)", backward_memory="input gradient"),
    Rule("identity / flatten", (nn.Identity, nn.Flatten), "nothing", "nothing", "0", "0", _nothing,
         memory=_no_memory, forward_memory="nothing", backward_memory="nothing"),
    Rule("squeeze-excitation: scale x input", (SqueezeExcitation,), "input and scale",
         "input and scale", "1 per element", "input: 1, scale: 2 per element", _squeeze_excitation,
         memory=_squeeze_excitation_memory, forward_memory="output",
         backward_memory="gradient x input (for the scale) and gradient x scale: two input-sized maps"),
    Rule("residual add (inverted residual, ResNet block)", RESIDUAL_BLOCKS, "nothing; input held",
         "nothing; input held", "1 per element", "0 (the gradient is passed on)", _residual_add,
         memory=_residual_add_memory, forward_memory="nothing in place (MobileNetV3, ResNet); output (MobileNetV2)",
         backward_memory="nothing: both branches get the same gradient"),
    Rule("lite residual patch: upsample + add", (LiteResidual,), "nothing; input held",
         "nothing; input held", "8 per output element", "7 per output element", _lite_residual,
         memory=_lite_residual_memory, forward_memory="the upsampled patch and the sum",
         backward_memory="the patch output's gradient"),
    Rule("MobileNetV2 global pooling (functional)", (mobilenetv2.MobileNetV2,), "nothing", "nothing",
         "1 per input element", "1 per input element", _functional_pool, memory=_functional_pool_memory,
         forward_memory="output", backward_memory="input gradient"),
    Rule("cross-entropy loss", (), "log-probabilities + targets", "nothing", "not counted",
         "not counted", _cross_entropy, memory=_cross_entropy_memory, forward_memory="the loss",
         backward_memory="gradients of the log-probabilities and the logits"),
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


def memory_rules_table() -> str:
    """What each layer type allocates while it runs, forward and backward (the training peak)."""
    lines = ["| layer | forward allocates | backward allocates |", "|---|---|---|"]
    lines += [f"| {r.layer} | {r.forward_memory} | {r.backward_memory} |" for r in RULES]
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
    training: TrainingPeak | None = None  # "pytorch" storage only

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
    def paper_peak_bytes(self) -> int:
        """Parameters + the activation peak: the paper's "memory footprint" (TinyTL's accounting,
        gradients, optimizer state and temporaries left out). Not what a device must fit: that is
        ``training_peak_bytes``."""
        return self.param_bytes + self.peak_activation_bytes

    @property
    def peak_bytes(self) -> int:
        """The former name of ``paper_peak_bytes``, kept for callers."""
        return self.paper_peak_bytes

    @property
    def training_peak(self) -> TrainingPeak:
        """The most tensor bytes alive during one training step, with its phase and layer."""
        if self.training is None:
            raise ValueError(f"the training peak counts what PyTorch really allocates: profile with "
                             f"convention 'pytorch', not {self.convention.name!r}")
        return self.training

    @property
    def training_peak_bytes(self) -> int:
        return self.training_peak.bytes

    @property
    def gradient_bytes(self) -> int:
        return 4 * self.params_trainable

    @property
    def optimizer_state_bytes(self) -> int:
        """Adam's two float32 moments per trainable parameter. The training peak's state also
        counts Adam's step count, 4 bytes per trained tensor (``training_state`` in ``to_dict``)."""
        return 8 * self.params_trainable

    def mb(self, n_bytes: int) -> float:
        return n_bytes / self.convention.bytes_per_mb

    def to_dict(self, layers: bool = True) -> dict:
        keys = ("params_total", "params_trainable", "params_frozen", "param_bytes", "forward_flops",
                "backward_flops", "backward_input_flops", "backward_weight_flops", "training_flops",
                "activation_bytes", "peak_activation_bytes", "paper_peak_bytes", "gradient_bytes",
                "optimizer_state_bytes")
        report = {"convention": self.convention.name, "input_shape": list(self.input_shape),
                  "bytes_per_mb": self.convention.bytes_per_mb}
        report.update({k: getattr(self, k) for k in keys})
        if self.training is not None:
            t = self.training
            report.update(training_peak_bytes=t.bytes, training_peak_phase=t.phase, training_peak_layer=t.layer,
                          training_state_bytes=t.state_bytes, training_step_bytes=t.step_bytes,
                          training_state={f"{k.replace(' ', '_')}_bytes": v for k, v in t.state.items()})
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
            f"paper peak      {mb(self.paper_peak_bytes):.3f} MB (parameters + activation peak "
            f"{mb(self.peak_activation_bytes):.3f}, as TinyTL and the paper count)",
        ]
        if self.training is None:
            lines.append(f"not in that peak gradients {mb(self.gradient_bytes):.3f} MB, Adam state "
                         f"{mb(self.optimizer_state_bytes):.3f} MB (training peak: convention 'pytorch')")
        else:
            t = self.training
            lines.append(f"training peak   {mb(t.bytes):.3f} MB of tensors alive at once: {mb(t.state_bytes):.3f} "
                         f"when the step begins + {mb(t.step_bytes):.3f} added, in the {t.phase} at {t.layer}")
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
    state: dict = field(default_factory=dict)  # bytes alive before a step: parameters, buffers, batch
    trainable: list = field(default_factory=list)  # (name, bytes) of each trainable parameter
    batch_key: int | None = None  # storage of the input batch
    boundary: tuple | None = None  # (calls before it, bytes): the frozen bottom's output made contiguous
    chunked: tuple = ()  # indices of the calls that bottom_chunk runs in chunks
    bottom_chunk: int | None = None  # the chunk the model was prepared with


def trace(model: nn.Module, input_shape=(8, 3, 224, 224), *, loss: bool = True,
          input_requires_grad: bool = False) -> Trace:
    """Run ``model`` once on zeros, as TinyTL's profiler does, and record its layer calls.

    ``loss``: a cross-entropy loss follows the output (the measured training step has one).
    ``input_requires_grad``: the input carries a gradient (a block inside a trained region).
    The model's BatchNorm statistics and the random number generator are left as they were,
    and a chunked frozen bottom (``bottom_chunk``) is traced whole, once.
    """
    input_shape = tuple(input_shape)
    if len(input_shape) != 4 or not all(isinstance(s, int) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape must be four positive integers (N, C, H, W), got {input_shape}")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    x = torch.zeros(input_shape, device=device).requires_grad_(input_requires_grad)
    calls, outputs, held, enclosing, uncounted, handles = [], {}, [], [], [], []
    names = {m: n for n, m in model.named_modules()}
    boundary = []

    def pre(module, args):
        if _holds_residual(module):
            held.append((module, args[0]))
        enclosing.append((module, args[0] if args else None))  # a module's call keeps its input alive

    def post(module, args, output):
        name, leaf = names[module] or "(model)", next(module.children(), None) is None
        outputs[names[module]] = output
        rule = rule_for(module)
        if rule is not None and (leaf or _holds_residual(module) or not isinstance(module, RESIDUAL_BLOCKS)):
            parts = {child: outputs.get(f"{names[module]}.{child}".lstrip("."))
                     for child in ("scale_activation", "patch", "features")}
            in_place = bool(calls) and _key(calls[-1].y) == _key(output)
            around = [(m, t) for m, t in enclosing[:-1] if isinstance(t, torch.Tensor)]
            calls.append(Call(name, module, args[0] if args else None, output, parts, [t for _, t in held],
                              around, in_place))
        elif rule is None and leaf:
            uncounted.append(f"{name} ({type(module).__name__})")
        if held and held[-1][0] is module:
            held.pop()
        enclosing.pop()
        if any(h is _contiguous_output for h in module._forward_hooks.values()) and calls and \
                _is_channels_last(calls[-1].y):
            boundary.append((len(calls), _nbytes(output)))

    statistics = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for b in m.buffers(recurse=False)]
    saved = [b.clone() for b in statistics]  # BatchNorm statistics move in train mode: put them back
    chunk, chain = bottom_chunk(model), _chunked_paths(model)
    set_bottom_chunk(model, None)
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
        set_bottom_chunk(model, chunk)
    if loss:
        calls.append(Call("loss", None, y, y))
    chunked = tuple(i for i, c in enumerate(calls) if any(c.name == p or c.name.startswith(p + ".") for p in chain))
    return Trace(calls, input_shape, uncounted, _state(model, x, loss), _trainable(model), _key(x),
                 boundary[0] if boundary else None, chunked, chunk)


def _chunked_paths(model: nn.Module) -> list:
    try:
        return [u.path for u in chunked_units(model)]
    except ValueError:  # not a whole network (a single block): nothing to chunk
        return []


def _state(model: nn.Module, x: torch.Tensor, loss: bool) -> dict:
    """Bytes alive when a step begins, before the optimizer's: parameters as stored (frozen
    weights in int8 with their scales), other buffers (BN statistics), the batch and its labels."""
    frozen = {_key(b) for m in model.modules() if isinstance(m, FrozenLayer)
              for n, b in m.named_buffers(recurse=False) if n.startswith("weight")}
    buffers = {_key(b): _nbytes(b) for b in model.buffers()}
    parameters = sum(_nbytes(p) for p in model.parameters()) + sum(v for k, v in buffers.items() if k in frozen)
    return {"parameters": parameters, "buffers": sum(v for k, v in buffers.items() if k not in frozen),
            "batch": _nbytes(x) + (8 * x.shape[0] if loss else 0)}


def _trainable(model: nn.Module) -> list:
    return [(n, _nbytes(p)) for n, p in model.named_parameters() if p.requires_grad]


def _is_channels_last(t) -> bool:
    return isinstance(t, torch.Tensor) and _channels_last(t)


def _holds_input(module) -> bool:
    """Containers whose input stays alive while their children run: residual blocks, and
    squeeze-excitation (``scale * input`` after the scale branch)."""
    return _holds_residual(module) or isinstance(module, SqueezeExcitation)


def _holds_residual(module) -> bool:
    """Blocks that keep their input alive for a skip connection while their body runs."""
    if isinstance(module, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
        return module.use_res_connect
    return isinstance(module, (resnet.BasicBlock, resnet.Bottleneck, LiteResidual))


def count(traced: Trace, convention: str | Convention = "pytorch", *, threads: int | None = None) -> Profile:
    """Apply the RULES of ``convention`` to a trace: per-layer FLOPs, parameters and bytes.

    Under ``pytorch`` storage it also runs the training step's memory phase by phase (see
    ``TrainingPeak``), with the CPU kernels PyTorch picks for ``threads`` (default: torch's).
    """
    cv = get_convention(convention)
    layers, stored_keys, stored_so_far, counted, kept_by_call = [], set(), 0, set(), []
    for call in traced.calls:
        rule = LOSS_RULE if call.module is None else rule_for(call.module)
        cost = rule.cost(call, cv)
        kept, what, keys = 0, [], []
        for key, n_bytes, label in cost.stored:
            if key not in stored_keys:  # pytorch: a storage kept by two layers counts once, first
                if cv.storage == "pytorch":  # paper: every layer counts what it keeps, as TinyTL
                    stored_keys.add(key)
                    keys.append((key, n_bytes))
                kept += n_bytes
                what.append(label)
        kept_by_call.append((kept, keys))
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
    training = None
    if cv.storage == "pytorch":
        training = _training_peak(traced, kept_by_call, torch.get_num_threads() if threads is None else threads)
    return Profile(layers, cv, traced.input_shape, traced.uncounted, training)


# ---------------------------------------------------------------------------------------------
# The training peak: every tensor alive at once during one step, phase by phase


PHASES = ("frozen-bottom forward", "trained forward", "backward", "optimizer step")

# The rules of the step, beside each layer's own (RULES' memory columns); the book prints them.
STEP_RULES = (
    ("when the step begins", "parameters as stored (frozen weights int8 + scales), buffers (BN statistics), "
                             "Adam's two moments and step count per trained tensor, the batch and its "
                             "labels; zero_grad(set_to_none=True) has freed the last step's gradients"),
    ("frozen-bottom forward", "only the running layer's input, output and temporaries: nothing is stored; "
                              "the bottom's channels-last output is copied to the default layout once"),
    ("bottom_chunk = c", "the bottom's layers run on c samples (their maps scale by c / batch) "
                         "beside the bottom's whole output, written chunk by chunk"),
    ("trained forward", "+ the activations stored so far, the inputs of enclosing residual blocks and "
                        "squeeze-excitations, the running layer's input, output and temporaries"),
    ("backward, at each layer in reverse", "+ the gradients of the parameters above it, the stored "
                                           "activations not yet freed (its own included), its output's "
                                           "gradient, the gradient waiting at each enclosing skip "
                                           "connection, and what its backward allocates"),
    ("optimizer step (Adam, CPU)", "+ every gradient; per parameter a square root and a quotient of "
                                   "its size (the update's denominator)"),
)


@dataclass(frozen=True)
class MemoryPoint:
    """Live tensor bytes at one moment of the step: the most while ``layer`` runs in ``phase``."""

    phase: str
    layer: str
    bytes: int


@dataclass(frozen=True)
class TrainingPeak:
    """The most tensor bytes alive at once during one training step, and where it happens.

    Unlike ``Profile.paper_peak_bytes`` (TinyTL's accounting, as the paper's tables count) it
    holds everything a device must fit: parameters, buffers, optimizer state, the batch,
    gradients, stored activations and each kernel's temporaries (``STEP_RULES``, ``RULES``).
    """

    bytes: int
    phase: str
    layer: str
    state: dict  # what exists when the step begins, by kind
    timeline: tuple  # MemoryPoint per layer, in the order the step runs

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def step_bytes(self) -> int:
        """What the step adds, at its peak, to what existed when it began."""
        return self.bytes - self.state_bytes


def _training_peak(traced: Trace, kept_by_call: list, threads: int) -> TrainingPeak:
    calls, n = traced.calls, traced.input_shape[0]
    state = {**traced.state, "optimizer state": sum(2 * b + 4 for _, b in traced.trainable)}  # Adam
    base, points = sum(state.values()), []
    first_trained = next((i for i, c in enumerate(calls) if c.y.requires_grad), len(calls))
    chunk = traced.bottom_chunk
    chunked = set(traced.chunked) if chunk is not None and chunk < n else set()
    chunk_output = _nbytes(calls[max(chunked)].y) if chunked else 0
    owner = {c.module: c for c in calls if c.module is not None and _holds_input(c.module)}

    def moments(call, backward):
        rule = LOSS_RULE if call.module is None else rule_for(call.module)
        return rule.memory(call, threads)[1 if backward else 0]

    # what each layer stores, less the batch (in the state already: the stem conv keeps it)
    kept = [k - sum(b for key, b in keys if key == traced.batch_key) for k, keys in kept_by_call]
    stored, stored_keys = 0, {traced.batch_key}
    for i, call in enumerate(calls):
        scale = chunk / n if i in chunked else 1
        alive = {_key(t): _nbytes(t) for _, t in call.enclosing}
        alive[_key(call.x)] = _nbytes(call.x)
        extra = max((b * scale + f for b, f in moments(call, False)), default=0)
        live = stored + kept[i] + scale * sum(v for k, v in alive.items() if k not in stored_keys) + extra
        phase = PHASES[0] if i < first_trained else PHASES[1]
        points.append(MemoryPoint(phase, call.name, int(base + live + (chunk_output if i in chunked else 0))))
        stored += kept[i]
        stored_keys.update(key for key, _ in kept_by_call[i][1])
        if traced.boundary and traced.boundary[0] == i + 1 and not chunked:
            points.append(MemoryPoint(PHASES[0], f"{call.name} (made contiguous)", base + 2 * traced.boundary[1]))
    grads, seen = 0, set()
    for i in reversed(range(first_trained, len(calls))):
        call = calls[i]
        grad_output = _nbytes(call.y) if call.y.requires_grad else 0
        pending = {}
        for module, t in call.enclosing:
            top = owner.get(module)
            if _holds_input(module) and t.requires_grad and not (top is not None and _key(top.y) == _key(call.y)):
                pending[_key(t)] = _nbytes(t)  # the skip connection's gradient, waiting
        extra = max((b + f for b, f in moments(call, True)), default=0)
        points.append(MemoryPoint(PHASES[2], call.name,
                                  base + grads + stored + grad_output + sum(pending.values()) + extra))
        if call.module is not None and call.module not in seen:
            seen.add(call.module)
            grads += sum(_nbytes(p) for p in call.module.parameters(recurse=False) if p.requires_grad)
        stored -= kept[i]
    grads = sum(b for _, b in traced.trainable)
    points += [MemoryPoint(PHASES[3], name, base + grads + 2 * b) for name, b in traced.trainable]
    peak = max(points, key=lambda p: p.bytes)
    return TrainingPeak(peak.bytes, peak.phase, peak.layer, state, tuple(points))


def profile(model: nn.Module, input_shape=(8, 3, 224, 224), *, convention: str | Convention = "pytorch",
            loss: bool = True, input_requires_grad: bool = False, threads: int | None = None) -> Profile:
    """Profile one training step of ``model`` (prepared or not) on inputs of ``input_shape``."""
    cv = get_convention(convention)  # a bad name fails before the forward pass
    return count(trace(model, input_shape, loss=loss, input_requires_grad=input_requires_grad), cv,
                 threads=threads)


def training_peak(model: nn.Module, input_shape=(8, 3, 224, 224), *, threads: int | None = None) -> TrainingPeak:
    """The most tensor bytes alive during one training step of a prepared ``model`` (Adam, CPU):
    ``.bytes``, and the ``.phase`` and ``.layer`` where it happens. ``threads``: torch's CPU threads
    during training (they choose some kernels; default: this process's)."""
    return profile(model, input_shape, threads=threads).training_peak


# ---------------------------------------------------------------------------------------------
# Models and single blocks


def profile_model(model: str | nn.Module, method: str, blocks: int | None = None, *, batch: int = 8,
                  resolution: int = 224, classes: int = 10, convention: str | Convention = "pytorch",
                  frozen_precision: str = "int8", optimize_bottom: bool = False, bottom_chunk: int | None = None,
                  threads: int | None = None) -> Profile:
    """``prepare`` a model for ``method`` and profile one training step at batch x 3 x res x res.

    By default the frozen bottom keeps its BNs, as the paper counts the network;
    ``optimize_bottom=True`` profiles what ``prepare`` runs by default (BNs folded into the convs),
    which is what ``model_training_peak`` counts.
    """
    check_positive(batch=batch, resolution=resolution, classes=classes)
    prepared = prepare(model, method, blocks, num_classes=classes, frozen_precision=frozen_precision,
                       optimize_bottom=optimize_bottom, resolution=resolution, bottom_chunk=bottom_chunk)
    return profile(prepared.model, (batch, 3, resolution, resolution), convention=convention, threads=threads)


def model_training_peak(model: str, method: str, blocks: int | None = None, *, batch: int = 8,
                        resolution: int = 224, classes: int = 10, frozen_precision: str = "int8",
                        bottom_chunk: int | None = None, threads: int | None = None) -> TrainingPeak:
    """The training peak of ``model`` as ``prepare(model, method, blocks, ...)`` runs it by default."""
    return profile_model(model, method, blocks, batch=batch, resolution=resolution, classes=classes,
                         frozen_precision=frozen_precision, optimize_bottom=True, bottom_chunk=bottom_chunk,
                         threads=threads).training_peak


SIZE_UNITS = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(text: str, name: str = "size") -> int:
    """Bytes in a size such as ``512MB``, ``1GB``, ``1.5GiB`` or ``300000000`` (MB = 10^6 bytes)."""
    number = str(text).strip()
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if number.endswith(u)), "B")
    number = number[: len(number) - len(unit)] if number.endswith(unit) else number
    try:
        value = float(number) * SIZE_UNITS[unit]
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name} must be a size such as 512MB, 1GB or 300MiB (units: {', '.join(SIZE_UNITS)}), "
                         f"got {text!r}")
    return int(value)


# Two batches on the same side of every kernel choice that depends on the batch (conv_kernel):
# from 16 samples on, each moment of the step grows exactly linearly with the batch.
_LINEAR_FROM = 16


def largest_batch(model: str, method: str, blocks: int | None, budget_bytes: int, *, resolution: int = 224,
                  classes: int = 10, frozen_precision: str = "int8", bottom_chunk: int | None = None,
                  threads: int | None = None, limit: int = 4096) -> int:
    """The largest batch whose training peak fits in ``budget_bytes`` of tensors (0: not even one).

    Below 16 samples it bisects (the peak grows with the batch); from 16 on, every point of the
    step's memory is a linear function of the batch, fitted exactly from two profiles (16 and 17).
    """
    return largest_batches(model, method, blocks, [budget_bytes], resolution=resolution, classes=classes,
                           frozen_precision=frozen_precision, bottom_chunk=bottom_chunk, threads=threads,
                           limit=limit)[0]


def largest_batches(model: str, method: str, blocks: int | None, budgets: list, *, resolution: int = 224,
                    classes: int = 10, frozen_precision: str = "int8", bottom_chunk: int | None = None,
                    threads: int | None = None, limit: int = 4096) -> list:
    """``largest_batch`` for several budgets, sharing the profiles."""
    check_positive(resolution=resolution, limit=limit, **{f"budget_bytes[{i}]": b for i, b in enumerate(budgets)})
    if bottom_chunk is not None and bottom_chunk >= _LINEAR_FROM:
        raise ValueError(f"largest_batch extrapolates from 16 samples up, so bottom_chunk must be below "
                         f"16, got {bottom_chunk}")
    profiled = {}

    def peak(batch):
        if batch not in profiled:
            profiled[batch] = model_training_peak(model, method, blocks, batch=batch, resolution=resolution,
                                                  classes=classes, frozen_precision=frozen_precision,
                                                  bottom_chunk=bottom_chunk, threads=threads)
        return profiled[batch]

    def largest(budget):
        if peak(_LINEAR_FROM - 1).bytes > budget:  # the peak grows with the batch: bisect below 16
            low, high = 0, _LINEAR_FROM - 1  # low fits (0: trivially), high does not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if peak(middle).bytes <= budget else (low, middle)
            return low
        best = limit
        for p, q in zip(peak(_LINEAR_FROM).timeline, peak(_LINEAR_FROM + 1).timeline):
            slope = q.bytes - p.bytes
            if slope > 0:
                best = min(best, _LINEAR_FROM + math.floor((budget - p.bytes) / slope))
            elif p.bytes > budget:
                best = _LINEAR_FROM - 1
        return max(_LINEAR_FROM - 1, min(best, limit))

    return [largest(b) for b in budgets]


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
