"""The symbolic stored-activation, parameter and MAC formulas of one block (theory.py, Table 1 and
Figure 1), checked against the analytic profiler, saved-tensor hooks and torchvision's modules."""
import pytest
import sympy as sp
import torch
from torchvision.models._utils import _make_divisible

from mobiletl_edu import theory as th
from mobiletl_edu.measure import saved_activations
from mobiletl_edu.methods import prepare_block
from mobiletl_edu.profiler import build_block, profile_block

CASES = [((8, 96, 7, 7), 1, 5), ((8, 96, 7, 7), 6, 5), ((2, 16, 9, 9), 3, 3), ((4, 24, 6, 5), 4, 7)]
SETTINGS = [(kind, method) for kind in th.BLOCK_KINDS for method in th.BLOCK_METHODS
            if not (kind == "conv" and method == "mobiletl")]
CONVENTIONS = {"pytorch": ("pytorch", 2), "paper": ("paper", 2), "paper-relu6-1bit": ("paper", 1)}


def values(shape, expansion, kernel):
    n, c, h, w = shape
    return {th.B: n, th.C: c, th.H: h, th.W: w, th.e: expansion, th.k: kernel, th.s: th.se_width(c, expansion)}


@pytest.mark.parametrize("channels", [8, 16, 17, 24, 40, 96, 100, 576])
@pytest.mark.parametrize("expansion", [1, 3, 4, 6])
def test_se_width_is_torchvisions(channels, expansion):
    assert th.se_width(channels, expansion) == _make_divisible(channels * expansion // 4, 8)


@pytest.mark.parametrize("shape, expansion, kernel", CASES)
@pytest.mark.parametrize("kind, method", SETTINGS)
def test_stored_bytes_equal_profiler_under_each_convention(shape, expansion, kernel, kind, method):
    subs = values(shape, expansion, kernel)
    for convention, (storage, relu6_bits) in CONVENTIONS.items():
        symbolic = th.block_stored_bytes(kind, method, storage, relu6_bits).subs(subs)
        analytic = profile_block(kind, method, shape, expansion=expansion, kernel=kernel, convention=convention)
        assert symbolic == analytic.activation_bytes, convention


@pytest.mark.parametrize("shape, expansion, kernel", CASES[1:3])
@pytest.mark.parametrize("kind, method", SETTINGS)
def test_pytorch_storage_equals_saved_tensor_hooks(shape, expansion, kernel, kind, method):
    block = prepare_block(build_block(kind, shape[1], expansion, kernel), method)
    measured = saved_activations(block, torch.randn(shape, requires_grad=True)).total_bytes
    assert th.block_stored_bytes(kind, method, "pytorch").subs(values(shape, expansion, kernel)) == measured


@pytest.mark.parametrize("shape, expansion, kernel", CASES)
@pytest.mark.parametrize("kind", th.BLOCK_KINDS)
def test_parameters_equal_the_modules(shape, expansion, kernel, kind):
    block = build_block(kind, shape[1], expansion, kernel)
    assert th.block_parameters(kind).subs(values(shape, expansion, kernel)) == sum(p.numel() for p in block.parameters())


def test_table1_parameters_and_stored_megabytes():
    subs = values((8, 96, 7, 7), 1, 5)
    assert [th.block_parameters(kind).subs(subs) for kind in th.BLOCK_KINDS] == [230_592, 21_408, 26_136]
    reported = {"conv": 0.306, "mbv2": 0.913, "mbv3": 1.362}
    for kind, mb in reported.items():  # Table 1 fits 1 bit per exact ReLU6 element
        ours = float(th.block_stored_bytes(kind, relu6_bits=1).subs(subs)) / 1e6
        assert ours == pytest.approx(mb, rel=0.01)


def test_figure1_reductions_need_two_bit_relu6_masks():
    subs = values((8, 96, 7, 7), 6, 5)

    def saved(kind, relu6_bits):
        vanilla = th.block_stored_bytes(kind, "ft-blocks", relu6_bits=relu6_bits).subs(subs)
        return 100 * (1 - th.block_stored_bytes(kind, "mobiletl").subs(subs) / vanilla)

    assert float(saved("mbv2", 2)) == pytest.approx(46.3, abs=0.3)
    assert float(saved("mbv2", 1)) < 46.0  # the Table 1 convention misses Figure 1
    assert float(saved("mbv3", 2)) == pytest.approx(53.3, abs=0.3)


def test_stored_bytes_do_not_depend_on_the_kernel_and_are_linear_in_batch():
    for kind, method in SETTINGS:
        expr = th.block_stored_bytes(kind, method)
        assert th.k not in expr.free_symbols
        assert sp.degree(expr, th.B) == 1 and expr.subs(th.B, 0) == 0


def test_forward_macs_of_table1_conv():
    assert th.block_forward_macs("conv").subs(values((8, 96, 7, 7), 1, 5)) == 8 * 49 * 25 * 96 * 96


@pytest.mark.parametrize("call, match", [
    (lambda: th.block_stored_terms("resnet"), "valid choices: conv, mbv2, mbv3"),
    (lambda: th.block_stored_terms("mbv2", "ft-all"), "valid choices: ft-blocks, mobiletl"),
    (lambda: th.block_stored_terms("mbv2", storage="tinytl"), "valid choices: paper, pytorch"),
    (lambda: th.block_stored_terms("conv", "mobiletl"), "inverted residual"),
    (lambda: th.block_parameters("mbv1"), "valid choices"),
    (lambda: th.block_forward_macs("mbv1"), "valid choices"),
])
def test_errors_name_the_bad_value_and_the_choices(call, match):
    with pytest.raises(ValueError, match=match):
        call()
