"""The training peak (profiler.TrainingPeak) against the allocator's own count of a warm step.

Independent truth: torch.profiler's memory events record every allocation and free of tensor
storage during a real step (measure.tensor_step); torch's op names say which convolution kernel
ran. The analytic side only reads the traced shapes and the rules of profiler.RULES/STEP_RULES.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from mobiletl_edu.cli import main
from mobiletl_edu.measure import tensor_step
from mobiletl_edu.methods import (FROZEN_BOTTOM_METHODS, GLOBAL_METHODS, METHODS, bottom_chunk, chunked_units,
                                  prepare, set_bottom_chunk)
from mobiletl_edu.profiler import PHASES, conv_kernel, largest_batch, model_training_peak, parse_size, training_peak

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
NOT_FOR = {"mobilenet_v2": {"remove-se"},  # no squeeze-excitation
           "resnet18": {"remove-se", "relu", "mobiletl-exp-bn", "mobiletl-dw-bn"}}  # no inverted residuals


def measured_and_analytic(name, method, batch, resolution, chunk=None):
    torch.manual_seed(0)
    model, optimizer = prepare(name, method, None if method in GLOBAL_METHODS else 3, num_classes=10,
                               resolution=resolution, bottom_chunk=chunk)
    x, y = torch.randn(batch, 3, resolution, resolution), torch.randint(0, 10, (batch,))
    return tensor_step(model, optimizer, x, y), training_peak(model, tuple(x.shape))


@pytest.mark.parametrize("name, method", [(n, m) for n in MODELS for m in METHODS if m not in NOT_FOR.get(n, ())])
def test_training_peak_within_10_percent_of_the_allocator(name, method):
    measured, analytic = measured_and_analytic(name, method, 2, 32)
    assert analytic.state == measured["state"]  # parameters as stored, buffers, Adam's state, the batch
    total = sum(measured["state"].values()) + measured["step_peak_bytes"]
    assert abs(analytic.bytes / total - 1) <= 0.10, (analytic.phase, analytic.layer)
    assert analytic.phase in PHASES


@pytest.mark.parametrize("name, method", [("mobilenet_v2", "ft-last"), ("mobilenet_v3_large", "mobiletl"),
                                          ("resnet18", "ft-all"), ("mobilenet_v3_small", "tinytl-lite-residual")])
def test_training_peak_with_16_samples_where_onednn_runs_the_1x1_convs(name, method):
    measured, analytic = measured_and_analytic(name, method, 16, 32)
    total = sum(measured["state"].values()) + measured["step_peak_bytes"]
    assert abs(analytic.bytes / total - 1) <= 0.10


@pytest.mark.parametrize("batch, kernel_size, stride, groups, size", [
    (4, 1, 1, 1, 16), (16, 1, 1, 1, 16), (4, 3, 1, 8, 16), (1, 3, 1, 1, 4), (1, 1, 2, 1, 8), (2, 5, 1, 1, 8)])
def test_conv_kernel_is_the_one_torch_runs(batch, kernel_size, stride, groups, size):
    conv = torch.nn.Conv2d(8, 8, kernel_size, stride, kernel_size // 2, groups=groups)
    x = torch.randn(batch, 8, size, size)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        conv(x)
    ran = {e.name for e in prof.events()}
    expected = {"onednn": "aten::mkldnn_convolution", "native-1x1": "aten::thnn_conv2d",
                "native-im2col": "aten::thnn_conv2d"}[conv_kernel(x, conv, torch.get_num_threads())]
    assert expected in ran


# --- bottom_chunk -------------------------------------------------------------------------------
def bottom_output(model, x):
    last = model.get_submodule(chunked_units(model)[-1].path)
    got = []
    handle = last.register_forward_hook(lambda m, a, o: got.append(o.detach().clone()))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return got[-1]


def test_a_chunked_bottom_computes_what_the_whole_batch_does():
    torch.manual_seed(0)
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10).model
    x = torch.randn(20, 3, 64, 64)
    whole = bottom_output(model, x)
    set_bottom_chunk(model, 4)  # 4 and 20 samples pick other 1x1 kernels (20 >= 16): float rounding
    assert bottom_chunk(model) == 4 and torch.allclose(bottom_output(model, x), whole, rtol=1e-5, atol=1e-5 *
                                                       whole.abs().max().item())
    assert torch.equal(bottom_output(model, x[:8]), bottom_output(copy.deepcopy(model), x[:8]))
    set_bottom_chunk(model, None)
    small = bottom_output(model, x[:8])
    set_bottom_chunk(model, 2)  # 2 and 8 samples: the same kernels, the same sums
    assert torch.equal(bottom_output(model, x[:8]), small)


def test_a_chunked_bottom_trains_like_the_whole_batch():
    x, y = torch.randn(6, 3, 64, 64), torch.randint(0, 10, (6,))
    grads = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10, bottom_chunk=chunk).model
        model.classifier[2].p = 0.0  # no dropout draws
        F.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_bottom_chunk_lowers_the_measured_peak_as_predicted():
    whole, whole_analytic = measured_and_analytic("mobilenet_v2", "ft-last", 8, 96)
    chunked, chunked_analytic = measured_and_analytic("mobilenet_v2", "ft-last", 8, 96, chunk=2)
    assert chunked["step_peak_bytes"] < 0.5 * whole["step_peak_bytes"]
    for measured, analytic in ((whole, whole_analytic), (chunked, chunked_analytic)):
        assert abs(analytic.step_bytes / measured["step_peak_bytes"] - 1) <= 0.10


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="mobiletl", blocks=3, bottom_chunk=0), "bottom_chunk must be a positive integer, got 0"),
    (dict(method="ft-all", bottom_chunk=2), "'ft-all' has no frozen bottom.*ft-last, ft-blocks"),
    (dict(method="mobiletl", blocks=3, bottom_chunk=2.5), "got 2.5"),
])
def test_bad_chunks_are_value_errors_naming_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare("mobilenet_v3_small", num_classes=10, **kwargs)


def test_every_frozen_bottom_method_can_chunk():
    for method in FROZEN_BOTTOM_METHODS:
        blocks = None if method in GLOBAL_METHODS else 3
        assert bottom_chunk(prepare("mobilenet_v3_small", method, blocks, num_classes=10, bottom_chunk=2).model) == 2


# --- what fits ----------------------------------------------------------------------------------
def test_largest_batch_is_the_last_that_fits(capsys):
    code, out, _ = run_cli(capsys, "profile", "--resolution", "64", "--fit-budget", "28MB", "--json")
    report = json.loads(out)
    largest = report["largest_batch"]
    assert code == 0 and report["fit_budget_bytes"] == 28 * 10**6 and largest > 16  # past the bisection
    peak = [model_training_peak("mobilenet_v3_small", "mobiletl", 3, batch=b, resolution=64).bytes
            for b in (largest, largest + 1)]
    assert peak[0] == report["largest_batch_peak_bytes"] <= 28 * 10**6 < peak[1]
    below = largest_batch("mobilenet_v3_small", "mobiletl", 3, 26_700_000, resolution=64)
    assert 1 <= below < 16 and model_training_peak("mobilenet_v3_small", "mobiletl", 3, batch=below + 1,
                                                   resolution=64).bytes > 26_700_000
    assert largest_batch("mobilenet_v3_small", "ft-all", None, 10**6, resolution=64) == 0
    code, out, _ = run_cli(capsys, "profile", "--resolution", "64", "--fit-budget", "1MB")
    one = model_training_peak("mobilenet_v3_small", "mobiletl", 3, batch=1, resolution=64).bytes
    assert code == 0 and f"1 MB of tensors: 0 (one sample needs {one / 1e6:.1f} MB)" in out


@pytest.mark.parametrize("text, expected", [("512MB", 512 * 10**6), ("1GB", 10**9), ("300MiB", 300 * 2**20),
                                            ("1.5GiB", int(1.5 * 2**30)), ("1000", 1000), ("64 kB", 64000)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


# --- CLI ----------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_profile_json_says_what_it_describes(capsys):
    code, out, _ = run_cli(capsys, "profile", "--resolution", "64", "--batch", "2", "--json")
    report = json.loads(out)
    assert code == 0 and report["blocks"] == 3  # the default, as for train
    assert {k: report[k] for k in ("model", "method", "batch", "resolution", "classes", "convention")} == dict(
        model="mobilenet_v3_small", method="mobiletl", batch=2, resolution=64, classes=10, convention="pytorch")
    assert report["training_peak_bytes"] == report["training_state_bytes"] + report["training_step_bytes"]
    assert all(isinstance(v, int) for k, v in report.items() if k.endswith("_bytes"))
    code, out, _ = run_cli(capsys, "profile", "--block", "mbv2", "--input-shape", "4,32,7,7", "--expansion", "6",
                           "--kernel", "3", "--json")
    report = json.loads(out)
    assert {k: report[k] for k in ("block", "input_shape", "expansion", "kernel")} == dict(
        block="mbv2", input_shape=[4, 32, 7, 7], expansion=6, kernel=3)


def test_summary_and_profile_count_the_same_frozen_parameters(capsys):
    code, out, _ = run_cli(capsys, "summary")
    frozen = int(out.splitlines()[-2].split()[-1].replace(",", ""))  # the total row, 3 blocks by default
    assert code == 0 and "counts of parameters" in out
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10).model
    by_hand = sum(p.numel() for p in model.parameters() if not p.requires_grad) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("weight_int8"))
    assert frozen == by_hand
    code, out, _ = run_cli(capsys, "profile", "--resolution", "32", "--batch", "2", "--json")
    assert json.loads(out)["params_frozen"] == frozen


@pytest.mark.parametrize("argv, message", [
    (["profile", "--fit-budget", "lots"], "'lots'"),
    (["profile", "--fit-budget", "0MB"], "MiB"),
    (["profile", "--bottom-chunk", "0"], "--bottom-chunk: must be a positive integer (1, 2, ...), got '0'"),
    (["profile", "--method", "ft-bn", "--bottom-chunk", "4"], "ft-last, ft-blocks"),
    (["profile", "--block", "mbv3", "--fit-budget", "1GB"], "model mode"),
])
def test_cli_bad_memory_arguments_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err


def test_train_refuses_a_bad_chunk_before_making_a_run_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--bottom-chunk", "0", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2 and "--bottom-chunk" in err and "'0'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "train", "--method", "ft-all", "--bottom-chunk", "2", "--out",
                           str(tmp_path / "run"), "--quiet")
    assert code == 2 and "'ft-all' has no frozen bottom" in err and "ft-last" in err
    assert not (tmp_path / "run").exists()


# --- plots --------------------------------------------------------------------------------------
def test_memory_timeline_plot_draws_the_measured_step_and_the_analytic_peak():
    from mobiletl_edu.plots import plot_memory_timeline
    torch.manual_seed(0)
    model, optimizer = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    run = tensor_step(model, optimizer, x, y, timeline=True)
    run["analytic"] = training_peak(model, tuple(x.shape))
    fig = plot_memory_timeline({"MobileTL-3": run})
    ax = fig.axes[0]
    measured, analytic = ax.lines[0], ax.lines[1]
    assert max(measured.get_ydata()) == run["step_peak_bytes"] / 1e6
    assert analytic.get_ydata()[0] == run["analytic"].step_bytes / 1e6
    assert len(ax.patches) == 4  # the four phases, shaded
    with pytest.raises(ValueError, match="timeline=True"):
        plot_memory_timeline({"x": {k: v for k, v in run.items() if k != "timeline"}})


def test_memory_growth_plot_has_a_line_and_dots_per_method():
    from mobiletl_edu.plots import plot_memory_growth
    rows = [{"method": m, "blocks": b, "axis": axis, "batch": n if axis == "batch" else 8,
             "resolution": 224 if axis == "batch" else n, "analytic": {"bytes": k * n * 1e6},
             "measured": {"tensor_peak_bytes": k * n * 1.01e6}}
            for m, b, k in (("ft-all", None, 3), ("mobiletl", 3, 1)) for axis in ("batch", "resolution")
            for n in (1, 2, 4)]
    fig = plot_memory_growth(rows)
    left = fig.axes[0]
    assert len(left.lines) == 4 and [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == [
        "FT-All", "MobileTL-3"]
    assert list(left.lines[2].get_ydata()) == [1.0, 2.0, 4.0] and left.get_yscale() == "log"
