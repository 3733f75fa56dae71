"""Frozen convolutions and linear layers, stored in int8 (or float) and never saving their input.

MobileTL freezes and quantizes the bottom blocks to 8 bits (Section "Block-wise fine-tuning").
We store each frozen weight as int8 with one float scale per output channel and dequantize it
in forward: plain tensors, portable across torch versions (the eager quantization API is
deprecated). A frozen layer inside the gradient path (FT-Bias, FT-BN, TinyTL patches) still
propagates the input gradient, which needs only the weight, so it saves no activation: eager
``nn.Conv2d`` with a frozen weight would still save its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .choices import PRECISIONS



def quantize_per_channel(weight: torch.Tensor):
    """Symmetric int8 per-output-channel quantization: ``weight ~= q * scale``."""
    dims = tuple(range(1, weight.dim()))
    scale = weight.detach().abs().amax(dim=dims).clamp_min(1e-12) / 127.0
    view = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.round(weight.detach() / scale.view(view)).clamp(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


class _FrozenWeightOp(torch.autograd.Function):
    """conv2d / linear with a constant weight: backward needs the weight, never the input.

    The layer is kept instead of the dequantized weight, so between forward and backward only
    the stored (int8) weight lives in memory; backward dequantizes it again.
    """

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.input_shape, ctx.dtype = layer, x.shape, x.dtype
        return layer.plain_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        layer, grad_x, grad_b = ctx.layer, None, None
        if ctx.needs_input_grad[0]:
            weight = layer.dequantized_weight(ctx.dtype)
            if layer.conv_args is None:
                grad_x = grad_out @ weight
            else:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, **layer.conv_args)
        if ctx.needs_input_grad[1]:
            channel_dim = 1 if layer.conv_args else grad_out.dim() - 1
            grad_b = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != channel_dim])
        return grad_x, grad_b, None


class FrozenLayer(nn.Module):
    """A frozen ``nn.Conv2d`` or ``nn.Linear``; the weight is int8 + per-channel scale, or float.

    The bias (if any) stays a parameter so FT-Bias can train it; everything else is a buffer.
    """

    def __init__(self, layer: nn.Module, precision: str = "int8"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError(f"unsupported padding {layer.padding!r}/{layer.padding_mode!r} in {layer}")
            self.conv_args = dict(stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=layer.groups)
        elif isinstance(layer, nn.Linear):
            self.conv_args = None
        else:
            raise ValueError(f"FrozenLayer wraps nn.Conv2d or nn.Linear, not {type(layer).__name__}")
        self.kind, self.precision, self.folded_batchnorm = type(layer).__name__, precision, False
        self.channels_last = False
        self.in_features = layer.weight.shape[1] * (layer.groups if self.conv_args else 1)
        self.out_features = layer.weight.shape[0]
        if precision == "int8":
            q, scale = quantize_per_channel(layer.weight)
            self.register_buffer("weight_int8", q)
            self.register_buffer("weight_scale", scale)
        else:
            self.register_buffer("weight_float", layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def absorb_batchnorm(self, bn: nn.Module) -> None:
        """Fold the frozen BatchNorm that follows this conv into it: ``bn(conv(x)) = conv'(x)``.

        BN computes ``(y - mean) * a + beta`` with ``a = gamma / sqrt(var + eps)`` per channel, so
        the folded conv has weight ``w * a`` and bias ``beta + (b - mean) * a``. In int8 only the
        per-channel scale changes (``scale * a``; ``a`` may be negative): quantizing ``w * a``
        afresh would give the same int8 values up to sign, so folding adds no rounding error.
        """
        if self.conv_args is None:
            raise ValueError("only a frozen conv absorbs a BatchNorm")
        with torch.no_grad():
            a = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            bias = 0 if self.bias is None else self.bias
            self.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * a, requires_grad=False)
            if self.precision == "int8":
                self.weight_scale = self.weight_scale * a
            else:
                self.weight_float = self.weight_float * a.view(-1, 1, 1, 1)
        self.folded_batchnorm = True

    def use_channels_last(self) -> None:
        """Convolve channels_last maps (oneDNN's faster layout on CPU): the input is converted if
        it is not one already. The frozen bottom needs this at every conv, because an op such as
        squeeze-excitation's ``scale * x`` hands back the default layout, and a 1x1 or depthwise
        weight cannot tell the conv which layout to pick. Nothing is trained there."""
        self.channels_last = self.conv_args is not None

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        if self.precision == "float":
            return self.weight_float.to(dtype)
        view = (-1,) + (1,) * (self.weight_int8.dim() - 1)
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype).view(view)

    def plain_forward(self, x):
        """conv2d / linear with the dequantized weight, recording nothing for autograd."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight, bias = self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias) if self.conv_args is None else F.conv2d(x, weight, bias, **self.conv_args)

    def forward(self, x):
        trainable_bias = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or trainable_bias):
            return _FrozenWeightOp.apply(x, self.bias, self)
        return self.plain_forward(x)  # the frozen bottom: no graph to build

    def extra_repr(self):
        folded = " + BN folded" if self.folded_batchnorm else ""
        return f"{self.kind} {self.in_features}->{self.out_features}, frozen {self.precision}{folded}"


def freeze_layers(module: nn.Module, precision: str = "int8") -> nn.Module:
    """Replace every Conv2d/Linear inside ``module`` (or ``module`` itself) by a FrozenLayer."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return FrozenLayer(module, precision)
    for name, child in list(module.named_children()):
        setattr(module, name, freeze_layers(child, precision))
    return module


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes the frozen weights of ``model`` take as stored: int8 values plus scales, or float copies."""
    return sum(b.numel() * b.element_size()
               for m in model.modules() if isinstance(m, FrozenLayer)
               for name, b in m.named_buffers(recurse=False) if name.startswith("weight"))
