"""Measured memory (mobiletl_edu.measure): saved tensors, and the peak of a step read from the OS."""
import json

import pytest
import torch
from torch import nn

from mobiletl_edu.cli import main
from mobiletl_edu.measure import StepPeak, saved_activations, step_peak_memory, step_times
from mobiletl_edu.methods import prepare

# the measuring process runs with one thread: two threads on a busy two-core machine crawl
ONE_THREAD = dict(threads=1)


def test_saved_activations_counts_each_storage_once_and_skips_parameters():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), conv)
    x = torch.randn(2, 3, 5, 5)
    stored = saved_activations(model, x, backward=False)
    # the first conv keeps x (its weight trains); ReLU keeps its output, which the second conv keeps too
    assert stored.total_bytes == x.numel() * 4 + 2 * 4 * 25 * 4
    assert stored.per_module == {"0": x.numel() * 4, "1": 2 * 4 * 25 * 4}


def test_step_peak_of_a_model_covers_its_saved_activations():
    spec = dict(model="mobilenet_v3_small", method="ft-all", batch=8, resolution=96, classes=10)
    model = prepare("mobilenet_v3_small", "ft-all", num_classes=10).model
    stored = saved_activations(model, torch.randn(8, 3, 96, 96), torch.randint(0, 10, (8,))).total_bytes
    peak = step_peak_memory(spec, **ONE_THREAD)
    assert peak.device == "cpu" and peak.cuda_peak_allocated is None
    assert peak.peak_reset  # Linux: /proc/self/clear_refs resets the resident peak
    assert peak.rss_before_step > 0 and peak.rss_peak >= peak.rss_before_step
    # every saved activation is resident at the end of the forward pass
    assert peak.rss_step_increase >= 0.9 * stored


def test_a_bad_spec_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="exactly one of 'model' or 'block'"):
        step_peak_memory({"method": "ft-all"})
    with pytest.raises(ValueError, match="mobilenet_v9"):
        step_peak_memory({"model": "mobilenet_v9", "method": "ft-all"}, **ONE_THREAD)
    with pytest.raises(ValueError, match="device"):
        step_peak_memory({"model": "mobilenet_v2", "method": "ft-all"}, device="tpu")


def test_step_peak_arithmetic():
    peak = StepPeak("cuda", 100, 250, True, 10, 70)
    assert peak.rss_step_increase == 150 and peak.cuda_step_increase == 60
    assert StepPeak("cpu", 100, 250, True).cuda_step_increase is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_covers_the_saved_activations():
    spec = dict(model="mobilenet_v3_small", method="ft-all", batch=8, resolution=224, classes=10)
    model = prepare("mobilenet_v3_small", "ft-all", num_classes=10).model
    stored = saved_activations(model, torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))).total_bytes
    peak = step_peak_memory(spec, device="cuda")
    assert peak.cuda_step_increase >= stored


def test_cli_measure_adds_the_measured_figures(capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads would outlive the test
    assert main(["profile", "--block", "mbv3", "--method", "mobiletl", "--expansion", "6", "--measure",
                 "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measured_activation_bytes"] == report["activation_bytes"]  # pytorch convention
    assert report["measured_rss_peak_bytes"] > 0 and report["measured_cuda_peak_bytes"] is None


def test_step_times_interleaves_the_setups_and_trains_each():
    """Every setup takes warmup + steps optimizer steps; a setup given its own inputs gets them."""
    seen, steps_taken = {}, {}

    class Probe(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.linear = name, nn.Linear(4, 3)

        def forward(self, x):
            seen.setdefault(self.name, []).append(x)
            return self.linear(x)

    setups = {}
    for name in ("a", "b"):
        model = Probe(name)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.register_step_post_hook(lambda o, args, kwargs, name=name: steps_taken.__setitem__(
            name, steps_taken.get(name, 0) + 1))
        setups[name] = (model, opt)
    x, y, other = torch.randn(2, 4), torch.tensor([0, 2]), torch.randn(2, 4)
    before = setups["a"][0].linear.weight.detach().clone()
    medians = step_times(setups, x, y, steps=4, warmup=1, inputs_for={"b": other})
    assert set(medians) == {"a", "b"} and all(t > 0 for t in medians.values())
    assert steps_taken == {"a": 5, "b": 5}
    assert all(t is x for t in seen["a"]) and all(t is other for t in seen["b"])
    assert not torch.equal(setups["a"][0].linear.weight, before)
