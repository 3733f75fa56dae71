"""Measured memory (mobiletl_edu.measure): saved tensors, the three views of a warm step, step times."""
import json

import pytest
import torch
from torch import nn

from mobiletl_edu.cli import main
from mobiletl_edu.measure import saved_activations, step_memory, step_times, tensor_step
from mobiletl_edu.methods import prepare


def test_saved_activations_counts_each_storage_once_and_skips_parameters():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), conv)
    x = torch.randn(2, 3, 5, 5)
    stored = saved_activations(model, x, backward=False)
    # the first conv keeps x (its weight trains); ReLU keeps its output, which the second conv keeps too
    assert stored.total_bytes == x.numel() * 4 + 2 * 4 * 25 * 4
    assert stored.per_module == {"0": x.numel() * 4, "1": 2 * 4 * 25 * 4}


def test_tensor_step_counts_what_a_hand_built_step_allocates():
    """A linear layer on a batch: every byte of the step is known in advance."""
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(16, 64), torch.randint(0, 32, (16,))
    result = tensor_step(model, optimizer, x, y, timeline=True)
    params = (64 * 32 + 32) * 4
    assert result["state"] == {"parameters": params, "buffers": 0, "optimizer state": 2 * params + 2 * 4,
                               "batch": x.numel() * 4 + 16 * 8}
    assert result["step_end_bytes"] == params  # the gradients stay until the next zero_grad
    # at least the logits, their log-softmax and the gradients were alive at once
    assert result["step_peak_bytes"] >= params + 2 * 16 * 32 * 4
    times = [t for t, _ in result["timeline"]]
    assert times == sorted(times) and max(b for _, b in result["timeline"]) == result["step_peak_bytes"]
    assert set(result["phases"]) == {"trained forward", "backward", "optimizer step"}


def test_tensor_step_of_a_prepared_model_marks_its_phases():
    torch.manual_seed(0)
    model, optimizer = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10)
    result = tensor_step(model, optimizer, torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)), timeline=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert result["step_end_bytes"] == sum(p.numel() * 4 for p in trainable)  # the gradients, nothing else
    assert result["state"]["optimizer state"] == sum(2 * p.numel() * 4 + 4 for p in trainable)  # Adam
    spans = result["phases"]
    assert set(spans) == {"frozen-bottom forward", "trained forward", "backward", "optimizer step"}
    assert spans["frozen-bottom forward"][1] <= spans["trained forward"][0] + 1e-9
    assert spans["trained forward"][1] <= spans["backward"][0] <= spans["optimizer step"][0]


def test_cli_measure_reports_the_three_views_of_a_fresh_process(capsys, monkeypatch):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads would outlive the test
    assert main(["profile", "--batch", "4", "--resolution", "64", "--measure", "--threads", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["measured_tensor_peak_bytes"] == r["measured_state_bytes"] + r["measured_tensor_step_peak_bytes"]
    assert r["measured_state_bytes"] == r["training_state_bytes"]  # enumerated there, counted from the trace here
    assert abs(r["training_peak_bytes"] / r["measured_tensor_peak_bytes"] - 1) <= 0.10
    assert r["measured_activation_bytes"] == r["activation_bytes"]  # saved-tensor hooks, pytorch convention
    # the cold first step pays one-time costs that no warm step does (tens of MB on a CPU)
    assert r["measured_cold_step_rss_bytes"] > r["measured_process_step_hwm_bytes"] >= 0
    assert r["measured_process_growth_bytes"] > 0


def test_a_bad_spec_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="exactly one of 'model' or 'block'"):
        step_memory({"method": "ft-all"})
    with pytest.raises(ValueError, match="mobilenet_v9.*mobilenet_v2"):
        step_memory({"model": "mobilenet_v9", "method": "ft-all"})
    with pytest.raises(ValueError, match="ft-everything.*ft-all"):
        step_memory({"block": "mbv3", "method": "ft-everything"})
    with pytest.raises(ValueError, match="device"):
        step_memory({"model": "mobilenet_v2", "method": "ft-all"}, device="tpu")
    with pytest.raises(ValueError, match="warmup"):
        step_memory({"model": "mobilenet_v2", "method": "ft-all"}, warmup=1)
    with pytest.raises(ValueError, match="blocks"):  # found in the measuring process, reported the same
        step_memory({"model": "mobilenet_v3_small", "method": "mobiletl", "blocks": 99, "resolution": 32})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_peak_covers_the_saved_activations():
    spec = dict(model="mobilenet_v3_small", method="ft-all", batch=8, resolution=224, classes=10)
    model = prepare("mobilenet_v3_small", "ft-all", num_classes=10).model
    stored = saved_activations(model, torch.randn(8, 3, 224, 224), torch.randint(0, 10, (8,))).total_bytes
    m = step_memory(spec, device="cuda")
    assert m.device == "cuda" and m.tensor_step_peak_bytes >= stored
    assert m.tensor_step_end_bytes >= sum(p.numel() * 4 for p in model.parameters())


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
