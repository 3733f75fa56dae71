"""Frozen conv/linear layers in int8 or float that save no activation (mobiletl_edu.quant)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from mobiletl_edu.measure import saved_activations
from mobiletl_edu.quant import FrozenLayer, freeze_layers, frozen_weight_bytes, quantize_per_channel


@given(rows=st.integers(1, 8), cols=st.integers(1, 20), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_per_channel_int8_error_is_at_most_half_a_step(rows, cols, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (rows,)
    assert q.abs().max() <= 127
    error = (q.float() * scale[:, None] - w).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-6)


CONVS = [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(4, 6, 1, bias=False),
    nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=False),  # depthwise
    nn.Conv2d(4, 8, 3, stride=2, padding=1, dilation=1, groups=2),
    nn.Linear(7, 3),
]


@pytest.mark.parametrize("layer", CONVS, ids=lambda m: repr(m))
@pytest.mark.parametrize("precision", ["int8", "float"])
def test_frozen_layer_matches_autograd_and_saves_nothing(layer, precision):
    layer = layer.double()
    frozen = FrozenLayer(layer, precision).double()
    if frozen.bias is not None:
        frozen.bias.requires_grad_(True)
    shape = (2, 7) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 9, 9)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    # reference: the same (dequantized) weight through torch's own op and autograd
    weight = frozen.dequantized_weight(torch.float64)
    if precision == "float":
        assert torch.equal(weight, layer.weight.detach())
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, weight, bias) if isinstance(layer, nn.Linear) else \
        F.conv2d(ref_x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = frozen(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    ref.backward(upstream)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(x.grad, ref_x.grad, atol=1e-10)
    if bias is not None:
        assert torch.allclose(frozen.bias.grad, bias.grad, atol=1e-10)
    small = x.detach()[:1, ..., :4, :4] if x.dim() == 4 else x.detach()[:1]
    assert torch.autograd.gradcheck(frozen, (small.clone().requires_grad_(True),))
    assert saved_activations(frozen, x.detach().requires_grad_(True), backward=False).total_bytes == 0


def test_eager_frozen_conv_still_saves_its_input():
    """The pitfall FrozenLayer avoids: nn.Conv2d with requires_grad=False weight keeps its input."""
    conv = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    assert saved_activations(conv, x, backward=False).total_bytes >= x.numel() * 4


def test_freeze_layers_replaces_every_conv_and_linear():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(1, 3, 6, 6))
    frozen = freeze_layers(net)
    kinds = [type(m).__name__ for m in frozen]
    assert kinds == ["FrozenLayer", "BatchNorm2d", "Flatten", "FrozenLayer"]
    assert all(m.weight_int8.dtype == torch.int8 for m in frozen if isinstance(m, FrozenLayer))


def test_int8_storage_is_a_quarter_of_float():
    conv = nn.Conv2d(32, 64, 3, bias=False)
    frozen = FrozenLayer(conv, "int8")
    stored = sum(b.numel() * b.element_size() for b in frozen.buffers())
    assert stored == conv.weight.numel() + 64 * 4  # one byte per weight + a float scale per channel


def test_bad_arguments():
    with pytest.raises(ValueError, match="int4"):
        FrozenLayer(nn.Linear(2, 2), "int4")
    with pytest.raises(ValueError, match="BatchNorm2d"):
        FrozenLayer(nn.BatchNorm2d(2))


def test_frozen_weight_bytes_counts_the_stored_weights():
    conv, linear = nn.Conv2d(8, 16, 3, bias=False), nn.Linear(16, 4)
    net = nn.Sequential(FrozenLayer(conv, "int8"), FrozenLayer(linear, "float"))
    assert frozen_weight_bytes(net) == (conv.weight.numel() + 16 * 4) + linear.weight.numel() * 4


def _bn_with_statistics(channels, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))  # some scales negative
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    return bn


@pytest.mark.parametrize("layer", [m for m in CONVS if isinstance(m, nn.Conv2d)], ids=lambda m: repr(m))
@pytest.mark.parametrize("precision", ["int8", "float"])
def test_absorbing_a_batchnorm_gives_the_same_map_and_keeps_the_int8_values(layer, precision):
    bn = _bn_with_statistics(layer.out_channels, seed=1)
    frozen = FrozenLayer(layer, precision)
    x = torch.randn(2, layer.in_channels, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = F.batch_norm(frozen.double()(x), bn.running_mean.double(), bn.running_var.double(),
                                bn.weight.double(), bn.bias.double(), eps=bn.eps)
    frozen = frozen.float()
    before = frozen.weight_int8.clone() if precision == "int8" else None
    frozen.absorb_batchnorm(bn)
    with torch.no_grad():
        folded = frozen.double()(x)
    assert frozen.folded_batchnorm and "BN folded" in repr(frozen)
    assert torch.allclose(folded, expected, rtol=1e-5, atol=1e-5)
    if precision == "int8":
        assert torch.equal(frozen.weight_int8, before)  # only the per-channel scales changed


def test_only_a_conv_absorbs_a_batchnorm():
    with pytest.raises(ValueError, match="only a frozen conv"):
        FrozenLayer(nn.Linear(3, 4)).absorb_batchnorm(nn.BatchNorm2d(4))
