"""The sign-approximated activations, bit packing and the frozen-shift BatchNorm (mobiletl_edu.ops)."""
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from mobiletl_edu.ops import (ShiftOnlyBatchNorm2d, pack_bits, sign_hardswish, sign_relu, sign_relu6,
                              unpack_bits)
from mobiletl_edu.measure import saved_activations

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# values where the exact and approximated derivatives change: 0, +-3 (Hard-Swish), 6 (ReLU6)
SPECIAL = [0.0, -0.0, 3.0, -3.0, 6.0, 1.5, -1.5, 1e-7, -1e-7, 2.999, -2.999, 6.001]


@st.composite
def tensors(draw, max_dims=4):
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=max_dims))
    n = math.prod(shape)
    values = draw(st.lists(st.one_of(st.floats(-10, 10, width=32), st.sampled_from(SPECIAL)),
                           min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).view(shape)


def grads(fn, x, upstream):
    x = x.clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def stored_bytes(fn, x):
    """Bytes autograd saves for fn(x), counted with saved-tensor hooks."""
    class Wrap(nn.Module):
        def forward(self, x):
            return fn(x)
    return saved_activations(Wrap(), x.requires_grad_(True), backward=False).total_bytes


@pytest.mark.parametrize("sign_fn, torch_fn", [(sign_hardswish, F.hardswish), (sign_relu6, F.relu6),
                                                (sign_relu, F.relu)])
@given(x=tensors(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_backward_is_upstream_times_sign_mask(sign_fn, torch_fn, x, seed):
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(grads(sign_fn, x, upstream), upstream * (x >= 0).to(x.dtype))
    assert torch.equal(sign_fn(x), torch_fn(x))


@given(x=tensors(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_relu6_approximation_exact_below_zero_and_inside_zero_six(x, seed):
    """d/dx ReLU6 = 1[0 < x < 6] (torch's convention) and the approximation is 1[x >= 0]:
    they agree for x < 0 and 0 < x < 6, and differ at x = 0 and x >= 6."""
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    approx, exact = grads(sign_relu6, x, upstream), grads(F.relu6, x, upstream)
    agree = (x < 0) | ((x > 0) & (x < 6))
    assert torch.equal(approx[agree], exact[agree])
    differ = ((x == 0) | (x >= 6)) & (upstream != 0)  # approx 1, exact 0
    assert not torch.any(approx[differ] == exact[differ])


@given(x=tensors(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_hardswish_approximation_error_bound(x, seed):
    """Exact (torch's convention at the kinks): 0 (x <= -3), (2x + 3)/6 (-3 < x < 3), 1 (x >= 3).
    Approximation 1[x >= 0]. Equal for x <= -3, x >= 3 and at x = +-1.5; elsewhere
    |1[x >= 0] - (2x + 3)/6| <= 1/2: on (-3, 0) it is |2x + 3|/6 < 1/2, on [0, 3) it is
    (3 - 2x)/6 <= 1/2, with equality only at x = 0."""
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(seed))
    approx, exact = grads(sign_hardswish, x, upstream), grads(F.hardswish, x, upstream)
    agree = (x <= -3) | (x >= 3) | (x.abs() == 1.5)
    assert torch.allclose(approx[agree], exact[agree], rtol=0, atol=1e-12)
    assert torch.all((approx - exact).abs() <= 0.5 * upstream.abs() + 1e-12)


def test_hardswish_bound_is_attained_at_zero_and_approached_at_three():
    x = torch.tensor([0.0, -3 + 1e-9, 3 - 1e-9], dtype=torch.float64)
    upstream = torch.ones_like(x)
    gap = (grads(sign_hardswish, x, upstream) - grads(F.hardswish, x, upstream)).abs()
    assert gap[0] == 0.5
    assert torch.all((gap[1:] < 0.5) & (gap[1:] > 0.5 - 1e-9))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("sign_fn, torch_fn", [(sign_hardswish, F.hardswish), (sign_relu6, F.relu6)])
def test_every_dtype_and_device(sign_fn, torch_fn, dtype, device):
    x = (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 5).to(dtype).to(device)
    assert torch.equal(sign_fn(x), torch_fn(x))
    upstream = torch.randn_like(x)
    g = grads(sign_fn, x, upstream)
    assert g.dtype == dtype and torch.equal(g, upstream * (x >= 0).to(dtype))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (2, 3, 5, 7), (8, 96, 7, 7), (3, 0)])
def test_sign_activation_stores_only_packed_mask(shape):
    x = torch.randn(shape)
    n = x.numel()
    for fn in (sign_hardswish, sign_relu6):
        assert stored_bytes(fn, x.clone()) == math.ceil(n / 8)
    # what eager PyTorch keeps instead: the whole float32 input
    if n:
        assert stored_bytes(F.hardswish, x.clone()) == 4 * n


@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), seed=st.integers(0, 2**16))
@settings(max_examples=100, deadline=None)
def test_pack_unpack_round_trip(shape, seed):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_pack_bits_layout_is_msb_first():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10000001, 0b10000000]


def _packed_by_hand(bits):
    """Independent truth: each group of eight booleans read as a binary number, first one highest."""
    bits = list(bits) + [False] * (-len(bits) % 8)
    return [int("".join("1" if b else "0" for b in bits[i:i + 8]), 2) for i in range(0, len(bits), 8)]


@given(n=st.integers(0, 200), start=st.integers(0, 9), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_pack_bits_matches_binary_numbers_also_for_sliced_input(n, start, seed):
    """The int64 multiply trick, and the fallback for big-endian machines, give the same bytes."""
    mask = (torch.rand(n + start, generator=torch.Generator().manual_seed(seed)) > 0.5)[start:]  # offset storage
    expected = _packed_by_hand(mask.tolist())
    assert pack_bits(mask).tolist() == expected
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "byteorder", "big")
        assert pack_bits(mask).tolist() == expected


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), step=st.integers(2, 3),
       transpose=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_pack_bits_accepts_any_strided_view(shape, step, transpose, seed):
    """Every-other-element slices and transposes (flat views that are not unit-stride) pack like a copy."""
    base = torch.rand([step * n for n in shape], generator=torch.Generator().manual_seed(seed)) > 0.5
    mask = base[tuple(slice(None, None, step) for _ in shape)]
    if transpose and mask.dim() > 1:
        mask = mask.transpose(0, -1)
    assert pack_bits(mask).tolist() == _packed_by_hand(mask.reshape(-1).tolist())
    assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)


def test_pack_bits_of_the_issue_example():
    assert pack_bits(torch.ones(16, dtype=torch.bool)[::2]).tolist() == [0b11111111]


def _pretrained_bn(channels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(channels, generator=g, dtype=torch.float64) + 0.1)
    return bn


def test_shift_only_bn_matches_eval_bn_gradients():
    bn = _pretrained_bn()
    shift_only = ShiftOnlyBatchNorm2d(bn)
    bn.eval().weight.requires_grad_(False)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    upstream = torch.randn_like(x)
    results = []
    for module in (bn, shift_only):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.backward(upstream)
        results.append((out.detach(), xi.grad, module.bias.grad))
    for ours, theirs in zip(results[1], results[0]):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_shift_only_bn_gradcheck():
    shift_only = ShiftOnlyBatchNorm2d(_pretrained_bn())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, bias):
        shift_only.bias.data = bias
        return shift_only(x)

    # gradcheck needs the shift as an input; route it through the module's parameter
    bias = shift_only.bias.detach().clone().requires_grad_(True)

    def g(x, bias):
        return x * (shift_only.weight * torch.rsqrt(shift_only.running_var + shift_only.eps)).view(1, -1, 1, 1) \
            + (bias - shift_only.running_mean * shift_only.weight
               * torch.rsqrt(shift_only.running_var + shift_only.eps)).view(1, -1, 1, 1)

    assert torch.autograd.gradcheck(shift_only, (x,))
    assert torch.autograd.gradcheck(g, (x, bias))
    assert torch.allclose(f(x, bias.detach()), g(x, bias))


def test_shift_only_bn_statistics_never_change_and_store_only_constants():
    bn = _pretrained_bn(channels=6).float()
    shift_only = ShiftOnlyBatchNorm2d(bn)
    before = {k: v.clone() for k, v in shift_only.state_dict().items()}
    x = torch.randn(8, 6, 7, 7) * 3 + 1
    for mode in (True, False):
        shift_only.train(mode)
        shift_only(x).sum().backward()
    after = shift_only.state_dict()
    for key in ("weight", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(before[key], after[key])
    assert stored_bytes(shift_only, x.clone()) == 6 * 4  # one float per channel
    # eager PyTorch: an eval BN with a frozen weight still saves its whole input
    bn.eval().weight.requires_grad_(False)
    assert stored_bytes(bn, x.clone()) >= x.numel() * 4
