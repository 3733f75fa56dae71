"""The analytic profiler (mobiletl_edu.profiler) against the paper's numbers and against measurement.

The paper's numbers are typed here from shared/paper/NOTES.md (Chiang et al. 2023), not taken
from the package. Where no single convention reproduces a number, the test states which
convention does and which does not (benchmarks/README.md explains why).
"""
import dataclasses
import functools
import json
import math
import re

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mobiletl_edu.cli import main
from mobiletl_edu.measure import saved_activations
from mobiletl_edu.methods import GLOBAL_METHODS, METHODS, prepare, prepare_block
from mobiletl_edu.profiler import (CONVENTIONS, RULES, build_block, count, finetuning_sweep, profile,
                                   profile_block, profile_model, rules_table, trace)

MB = 1e6


def rel(ours, reported):
    return abs(ours - reported) / reported


@functools.lru_cache(maxsize=None)
def traced_model(name, method, blocks=None, classes=10, batch=8, resolution=224):
    """One trace per setting, shared by the tests (a 224x224 trace takes about a second)."""
    torch.manual_seed(0)
    model = prepare(name, method, blocks, num_classes=classes, optimize_bottom=False).model  # the paper's network
    return trace(model, (batch, 3, resolution, resolution))


# --- Table 1: one block, input (8, 96, 7, 7), expansion 1, 5x5 kernels -------------------------
TABLE1 = {"conv": (230_592, 541.67, 0.306), "mbv2": (21_408, 51.56, 0.913), "mbv3": (26_136, 52.91, 1.362)}


@pytest.mark.parametrize("kind", TABLE1)
def test_table1_parameters_are_exact(kind):
    assert sum(p.numel() for p in build_block(kind, 96, 1, 5).parameters()) == TABLE1[kind][0]
    assert profile_block(kind, "ft-blocks").params_total == TABLE1[kind][0]


@pytest.mark.parametrize("kind", TABLE1)
def test_table1_flops_within_5_percent(kind):
    flops = profile_block(kind, "ft-blocks").training_flops / 1e6
    assert rel(flops, TABLE1[kind][1]) < 0.05


@pytest.mark.parametrize("convention", ["paper", "paper-relu6-1bit"])
@pytest.mark.parametrize("kind", TABLE1)
def test_table1_stored_activations_within_1_percent(kind, convention):
    stored = profile_block(kind, "ft-blocks", convention=convention).activation_bytes / MB
    assert rel(stored, TABLE1[kind][2]) < 0.01


def test_table1_mbv2_row_is_the_1_bit_relu6_count():
    """0.913 MB is six float maps + two 1-bit masks: 1 bit per ReLU6, not Table 2's 2 bits."""
    one_bit = profile_block("mbv2", "ft-blocks", convention="paper-relu6-1bit").activation_bytes / MB
    assert abs(one_bit - 0.913) < 0.0005
    assert abs(profile_block("mbv2", "ft-blocks", convention="paper").activation_bytes / MB - 0.913) > 0.005


def test_table1_under_pytorch_only_the_mbv3_row_agrees():
    """Eager PyTorch keeps ReLU's output and a copy of an in-place ReLU6's input: far above the paper."""
    stored = {k: profile_block(k, "ft-blocks").activation_bytes / MB for k in TABLE1}
    assert rel(stored["mbv3"], 1.362) < 0.01
    assert rel(stored["conv"], 0.306) > 0.4 and rel(stored["mbv2"], 0.913) > 0.3


# --- Figure 1: expansion 6, MobileTL against vanilla -------------------------------------------
def reduction(kind, convention):
    vanilla = profile_block(kind, "ft-blocks", expansion=6, convention=convention).activation_bytes
    ours = profile_block(kind, "mobiletl", expansion=6, convention=convention).activation_bytes
    return 100 * (1 - ours / vanilla)


def test_figure1_reductions_under_the_paper_convention():
    assert abs(reduction("mbv2", "paper") - 46.3) <= 0.3
    assert abs(reduction("mbv3", "paper") - 53.3) <= 0.3


def test_figure1_mbv2_needs_2_bits_per_relu6():
    assert abs(reduction("mbv2", "paper-relu6-1bit") - 46.3) > 0.3


def test_figure1_mbv3_also_holds_for_what_pytorch_stores():
    assert abs(reduction("mbv3", "pytorch") - 53.3) <= 0.3


# --- Figure 4: MobileNetV3-Small, global fine-tuning, batch 8, 224x224 -------------------------
def test_figure4_global_finetuning():
    result = count(traced_model("mobilenet_v3_small", "ft-all"), "paper")
    assert rel(result.forward_flops / 1e6, 1000.6) < 0.03
    assert rel(result.backward_flops / 1e6, 1934.92) < 0.03
    assert rel(result.activation_bytes / MB, 129.7) < 0.03


def test_figure4_stored_activations_also_under_pytorch():
    result = count(traced_model("mobilenet_v3_small", "ft-all"), "pytorch")
    assert rel(result.activation_bytes / MB, 129.7) < 0.03


def test_figure4_sweep_grows_with_the_number_of_blocks():
    sweep = finetuning_sweep("mobilenet_v3_small", batch=2, resolution=64)
    labels = list(sweep)
    assert labels[0] == "FT-Last" and labels[-1] == "FT-All" and len(labels) == 11 + 2
    backward = [p.backward_flops for p in sweep.values()]
    stored = [p.activation_bytes for p in sweep.values()]
    trainable = [p.params_trainable for p in sweep.values()]
    for series in (backward, stored, trainable):
        assert all(a < b for a, b in zip(series, series[1:])), series


def test_abstract_36_percent_fewer_flops_with_5_blocks_of_mobilenet_v3_small():
    full = count(traced_model("mobilenet_v3_small", "ft-all"), "paper").training_flops
    five = count(traced_model("mobilenet_v3_small", "ft-blocks", 5), "paper").training_flops
    assert abs(100 * (1 - five / full) - 36) <= 1.0


# --- Table 3: Proxyless-Mobile, CIFAR-100, batch 8 ----------------------------------------------
TABLE3 = {"ft-all": (382.7, 16_205.0, 2_927_612), "ft-bn": (189.9, 11_066.1, 162_596),
          "ft-bias": (30.6, 10_446.5, 145_348), "ft-last": (29.0, 5_325.9, 128_100)}


@pytest.mark.parametrize("method", TABLE3)
def test_table3_rows_under_the_paper_convention(method):
    memory, flops, trainable = TABLE3[method]
    result = count(traced_model("proxyless_mobile", method, classes=100), "paper")
    assert result.params_trainable == trainable
    assert rel(result.paper_peak_bytes / MB, memory) < 0.05
    assert rel(result.training_flops / 1e6, flops) < 0.05


# --- Analytic against measured ------------------------------------------------------------------
CASES = [(model, method) for model in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
         for method in METHODS if not (model == "mobilenet_v2" and method == "remove-se")]


@pytest.mark.parametrize("model_name, method", CASES)
def test_pytorch_convention_agrees_with_saved_tensor_hooks(model_name, method):
    torch.manual_seed(0)
    model = prepare(model_name, method, None if method in GLOBAL_METHODS else 2, num_classes=10, resolution=32).model
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    analytic = profile(model, tuple(x.shape))
    measured = saved_activations(model, x, y)
    assert abs(analytic.activation_bytes - measured.total_bytes) <= 0.02 * measured.total_bytes
    per_layer = {}
    for layer in analytic.layers:
        per_layer[layer.name] = per_layer.get(layer.name, 0) + layer.activation_bytes
    assert {k: v for k, v in per_layer.items() if v} == {k: v for k, v in measured.per_module.items() if v}
    assert analytic.uncounted == []


@pytest.mark.parametrize("kind, method", [("mbv3", "ft-blocks"), ("mbv3", "mobiletl"), ("mbv2", "mobiletl"),
                                          ("conv", "ft-blocks")])
def test_block_profile_agrees_with_measurement(kind, method):
    block = prepare_block_for_test(kind, method)
    x = torch.randn(4, 96, 7, 7, requires_grad=True)
    measured = saved_activations(block, x).total_bytes
    assert profile(block, x.shape, loss=False, input_requires_grad=True).activation_bytes == measured


def prepare_block_for_test(kind, method):
    return prepare_block(build_block(kind, 96, 6, 5), method)


@pytest.mark.parametrize("method, blocks", [("ft-all", None), ("ft-bias", None), ("ft-last", None),
                                            ("mobiletl", 3), ("tinytl-lite-residual", 2)])
def test_conv_and_linear_flops_match_torch_flop_counter(method, blocks):
    """A frozen layer below the trained region costs no backward; one inside it passes the gradient on."""
    torch.manual_seed(0)
    # BNs not folded: a folded conv gains a bias, whose additions torch's counter leaves out
    model = prepare("mobilenet_v3_small", method, blocks, num_classes=10, optimize_bottom=False,
                    resolution=64).model
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    analytic = profile(model, tuple(x.shape))
    ours = sum(layer.forward_flops + layer.backward_flops for layer in analytic.layers
               if "Conv2d" in layer.rule)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) \
            as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    # torch counts 2 FLOPs per multiply-accumulate and no bias additions: ours add one per output
    assert abs(ours - counter.get_total_flops()) <= 0.005 * counter.get_total_flops()


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, out_shape=None, **kwargs):
    """Autograd's output_mask says which gradients a conv computes; each costs its forward, 2 x MACs.

    (torch's own formula for convolution_backward ignores groups, so depthwise convs come out
    C times too large; only the mask matters here.)
    """
    output_mask = args[7]
    macs = math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return 2 * macs * (int(output_mask[0]) + int(output_mask[1]))


def test_frozen_bottom_costs_no_backward():
    result = count(traced_model("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64))
    bottom = [layer for layer in result.layers if re.match(r"features\.[0-8]\.", layer.name)]
    assert bottom and all(layer.backward_flops == 0 and layer.activation_bytes == 0 for layer in bottom)
    assert all(layer.forward_flops > 0 for layer in bottom if "Conv2d" in layer.rule)


# --- Conventions and rules ----------------------------------------------------------------------
def test_conventions_switch_one_thing_at_a_time():
    conv_macs = 8 * 96 * 96 * 25 * 7 * 7  # the 5x5 conv of Table 1's first row
    per_mac = dataclasses.replace(CONVENTIONS["paper"], name="macs", flops_per_mac=1)
    assert profile_block("conv", convention=per_mac).layers[0].forward_flops == conv_macs
    assert profile_block("conv", convention="paper").layers[0].forward_flops == 2 * conv_macs
    full_relu6 = dataclasses.replace(CONVENTIONS["paper"], name="full", relu6_mask_bits=32)
    masks = profile_block("mbv2", convention="paper").activation_bytes
    assert profile_block("mbv2", convention=full_relu6).activation_bytes - masks == 2 * 8 * 96 * 49 * (4 - 0.25)
    mib = dataclasses.replace(CONVENTIONS["paper"], name="mib", bytes_per_mb=2 ** 20)
    result = profile_block("mbv3", convention=mib)
    assert result.mb(result.activation_bytes) == result.activation_bytes / 2 ** 20


def test_parameters_are_counted_at_their_storage_precision():
    result = count(traced_model("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64), "pytorch")
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10, optimize_bottom=False).model  # as profiled
    stored = sum(p.numel() * p.element_size() for p in model.parameters())
    stored += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(("_int8", "_scale")))
    assert result.param_bytes == stored
    assert result.params_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result.gradient_bytes == 4 * result.params_trainable
    as_float = profile_model("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64, frozen_precision="float")
    assert as_float.param_bytes == 4 * as_float.params_total
    assert count(traced_model("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64), "paper").param_bytes == \
        4 * result.params_trainable + result.params_frozen  # the paper: frozen parameters at 8 bits
    assert result.optimizer_state_bytes == 2 * result.gradient_bytes  # Adam's two moments


def test_profiling_leaves_the_model_and_the_random_stream_alone():
    model = prepare("mobilenet_v3_small", "ft-all", num_classes=10).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    profile(model, (2, 3, 64, 64))
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rules_table_has_one_row_per_rule():
    text = rules_table()
    assert len(text.splitlines()) == len(RULES) + 2
    for rule in RULES:
        assert rule.layer in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="mobilenet_v3_small", method="ft-all", convention="tinytl"), "tinytl"),
    (dict(model="mobilenet_v3_small", method="ft-all", batch=0), "batch"),
    (dict(model="mobilenet_v3_small", method="mobiletl"), "blocks"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile_model(**kwargs)


def test_bad_block_arguments_name_the_value():
    with pytest.raises(ValueError, match="mbv9"):
        build_block("mbv9")
    with pytest.raises(ValueError, match="ft-all"):
        profile_block("mbv3", "ft-all")


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_model_mode_json(capsys):
    assert main(["profile", "--model", "mobilenet_v3_small", "--method", "mobiletl", "--blocks", "3",
                 "--resolution", "64", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_trainable", "forward_flops", "backward_flops", "activation_bytes",
                "paper_peak_bytes", "training_peak_bytes"):
        assert isinstance(report[key], int) and report[key] > 0
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10).model  # pytorch: as prepare runs it
    assert report["params_total"] == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("weight_int8"))
    assert report["network"].startswith("as prepare runs it")


def test_cli_block_mode_prints_a_table(capsys):
    assert main(["profile", "--block", "mbv2", "--input-shape", "8,96,7,7", "--expansion", "1", "--kernel", "5",
                 "--method", "ft-blocks", "--convention", "paper-relu6-1bit"]) == 0
    out = capsys.readouterr().out
    assert "21,408" in out and "0.913 MB stored for backward" in out


@pytest.mark.parametrize("argv, message", [
    (["--block", "mbv3", "--input-shape", "8,96,7"], "input-shape"),
    (["--block", "mbv3", "--method", "ft-all"], "ft-all"),
    (["--method", "mobiletl", "--blocks", "0"], "blocks"),
    (["--model", "mobilenet_v2", "--block", "mbv2"], "not both"),
])
def test_cli_user_errors_are_one_line(capsys, argv, message):
    assert main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


# --- Plots --------------------------------------------------------------------------------------
def test_figure4_style_plot():
    from mobiletl_edu.plots import plot_finetuning_sweep
    sweep = {label: count(traced_model("mobilenet_v3_small", method, k, batch=2, resolution=64), "paper")
             for label, method, k in (("FT-Last", "ft-last", None), ("FT-3-BLKs", "ft-blocks", 3),
                                      ("FT-All", "ft-all", None))}
    fig = plot_finetuning_sweep(sweep)
    bars, memory = fig.axes
    assert len(bars.patches) == 2 * len(sweep)
    assert [round(h, 6) for h in memory.lines[0].get_ydata()] == [round(p.activation_bytes / MB, 6)
                                                                 for p in sweep.values()]


def test_figure1_style_plot():
    from mobiletl_edu.plots import plot_block_activations
    vanilla = profile_block("mbv3", "ft-blocks", expansion=6, convention="paper")
    ours = profile_block("mbv3", "mobiletl", expansion=6, convention="paper")
    fig = plot_block_activations(vanilla, ours)
    storing = [a for a, b in zip(vanilla.layers, ours.layers) if a.activation_bytes or b.activation_bytes]
    assert len(fig.axes[0].patches) == 2 * len(storing)
    assert "53.2 % less" in fig.axes[0].get_legend().get_title().get_text()
    with pytest.raises(ValueError, match="not of the same block"):
        plot_block_activations(vanilla, profile_block("mbv2", "mobiletl", expansion=6))
