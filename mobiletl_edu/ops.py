"""The operators that make MobileTL save memory (Chiang et al. 2023, Table 2 and Eq. 1-2).

* ``sign_hardswish`` / ``sign_relu6`` / ``sign_relu``: the exact forward, and a backward that
  multiplies the upstream gradient by ``1[x >= 0]``. For backward they keep one bit per
  element, packed into ``ceil(n / 8)`` bytes.
* ``pack_bits`` / ``unpack_bits``: bit packing in plain tensor ops.
* ``ShiftOnlyBatchNorm2d``: a BatchNorm whose statistics and scale are frozen and whose
  shift trains. ``y = x * a + (beta - mean * a)`` with ``a = gamma / sqrt(var + eps)`` a
  per-channel constant, so backward keeps ``a`` (C numbers) instead of the input map.

Eager PyTorch gives none of this for free: ``F.hardswish`` and ``F.relu6`` save their whole
input, and an eval-mode ``nn.BatchNorm2d`` saves its input even with a frozen weight.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

# Eight 0/1 bytes read as one little-endian int64 hold bit i of byte k at position 8k. Multiplying
# by this constant (bytes 1, 2, 4, ..., 128 from low to high) adds a copy of byte k shifted by
# 8j + j for every j; the copies with k + j = 7 land on bits 63 - k of the product, the others
# on distinct lower bits or past bit 63, so nothing carries: the top byte is the eight booleans,
# byte 0 in its most significant bit. Written as the signed int64 with the same bits.
_GATHER_BITS = 0x8040201008040201 - (1 << 64)
_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor of any shape into ``ceil(numel / 8)`` uint8 bytes (MSB first)."""
    # contiguous(): a view whose flat form is not unit-stride (a slice, a transpose) is copied
    flat = mask.reshape(-1).to(torch.bool).contiguous().view(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad or flat.storage_offset() % 8:  # a fresh tensor: whole, aligned 8-byte words
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if sys.byteorder != "little":  # the word trick assumes little-endian; weigh and sum instead
        weights = torch.tensor([1 << s for s in _SHIFTS], dtype=torch.uint8, device=flat.device)
        return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    return ((flat.view(torch.int64) * _GATHER_BITS) >> 56).to(torch.uint8)


def _bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` bits of ``packed`` as a flat uint8 tensor of 0s and 1s."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)[:n]


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a boolean tensor of ``shape``."""
    shape = torch.Size(shape)
    return _bits(packed, shape.numel()).view(shape).bool()


_FORWARDS = {"hardswish": F.hardswish, "relu6": F.relu6, "relu": F.relu}


class _SignApproximated(torch.autograd.Function):
    """Exact activation forward; backward ``grad * 1[x >= 0]`` from a 1-bit packed mask."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.shape = x.shape
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(pack_bits(x >= 0))
        return _FORWARDS[kind](x)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        return grad_out * _bits(packed, ctx.shape.numel()).view(ctx.shape), None  # uint8 0/1 promotes


def sign_hardswish(x: torch.Tensor) -> torch.Tensor:
    """Hard-Swish forward; backward approximated by the sign mask (Table 2, 'Ours')."""
    return _SignApproximated.apply(x, "hardswish")


def sign_relu6(x: torch.Tensor) -> torch.Tensor:
    """ReLU6 forward; backward approximated by the sign mask (Table 2, 'Ours')."""
    return _SignApproximated.apply(x, "relu6")


def sign_relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU forward; backward ``1[x >= 0]`` (differs from torch's ``1[x > 0]`` only at 0)."""
    return _SignApproximated.apply(x, "relu")


class SignHardswish(nn.Module):
    """Module form of :func:`sign_hardswish`."""

    def forward(self, x):
        return sign_hardswish(x)


class SignReLU6(nn.Module):
    """Module form of :func:`sign_relu6`."""

    def forward(self, x):
        return sign_relu6(x)


class SignReLU(nn.Module):
    """Module form of :func:`sign_relu` (ResNet blocks, Figure 7)."""

    def forward(self, x):
        return sign_relu(x)


class ShiftOnlyBatchNorm2d(nn.Module):
    """Frozen-shift BatchNorm: statistics and scale frozen, only the shift ``bias`` trains.

    Keeps BatchNorm's parameter and buffer names, so a state dict moves between the two.
    Its running statistics never change, in ``train()`` or ``eval()``.
    """

    def __init__(self, bn: nn.BatchNorm2d, train_shift: bool = True):
        super().__init__()
        if bn.running_mean is None or bn.weight is None:
            raise ValueError("ShiftOnlyBatchNorm2d needs an affine BatchNorm2d with running statistics")
        self.num_features, self.eps = bn.num_features, bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bn.bias.detach().clone(), requires_grad=train_shift)
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.bias.requires_grad)):
            # nothing to differentiate (the frozen bottom): torch's fused eval-mode kernel
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        with torch.no_grad():  # per-channel constants, built from frozen tensors
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            offset = -self.running_mean * scale
            scale, offset = (t.to(x.dtype).view(1, -1, 1, 1) for t in (scale, offset))
        # ``x * scale`` keeps only ``scale`` for backward; the add keeps nothing.
        return x * scale + (offset + self.bias.to(x.dtype).view(1, -1, 1, 1))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, " + ("shift only" if self.bias.requires_grad else "frozen")
