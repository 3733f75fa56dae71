"""The latency model (mobiletl_edu.deploy.latency): its counts, its fits, its constants.

Independent truths: hand-counted bytes of a linear layer's forward pass, and synthetic
steps built from known constants, which the fits must recover.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mobiletl_edu.deploy import latency
from mobiletl_edu.deploy import run as runner

HOST = latency.Constants({k: 1e-11 * (i + 1) for i, k in enumerate(latency.KEYS)}, 2e-10, 5e-6)


def synthetic_phases(seed: int, n: int = 60) -> list:
    """Phases of every kind and pass with made-up work, timed exactly by HOST."""
    g = torch.Generator().manual_seed(seed)
    phases = []
    for i in range(n):
        kind = latency.KINDS[i % len(latency.KINDS)]
        phase = ("forward", "backward")[i // len(latency.KINDS) % 2]
        flops, weight, nbytes, ops = (int(v) for v in torch.randint(1, 10**7, (4,), generator=g))
        p = latency.Phase(f"l{i}", kind, phase, flops, weight if phase == "backward" else 0, nbytes, ops % 20 + 1)
        phases.append(p._replace(seconds=latency.phase_seconds(p, HOST)))
    return phases


def test_the_host_fit_recovers_known_constants():
    fitted = latency.fit_host(synthetic_phases(0))
    for k in latency.KEYS:
        assert fitted.per_flop[k] == pytest.approx(HOST.per_flop[k], rel=1e-6)
    assert fitted.per_byte == pytest.approx(HOST.per_byte, rel=1e-6)
    assert fitted.per_op == pytest.approx(HOST.per_op, rel=1e-6)


@pytest.mark.parametrize("processor", ["cpu", "gpu"])
def test_the_device_fit_recovers_a_known_slowdown(processor):
    a, b = latency.TIED[processor]
    truth = latency.Slowdown(**{a: 3.0, b: 3.0, next(t for t in latency.Slowdown._fields if t not in (a, b)): 7.0})
    device = HOST.on_device(truth)
    cells = {s: (ph, latency.predict(ph, device)) for s, ph in (("x", synthetic_phases(1)), ("y", synthetic_phases(2)))}
    fitted = latency.fit_device(HOST, cells, processor)
    assert fitted == pytest.approx(truth, rel=1e-6)


def test_a_phase_counts_the_bytes_and_ops_it_runs():
    """A 1x1 convolution's forward reads x, W and b and writes y; its backward (the weight
    trains, the input does not) writes the weight and bias gradients (hand count)."""
    layer = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten())
    phases = latency.step_phases(layer, (2, 3, 5, 5))
    forward, backward = (next(p for p in phases if p.layer == "0" and p.phase == ph)
                         for ph in ("forward", "backward"))
    assert forward.kind == "conv" and forward.flops == 2 * (2 * 4 * 25) * 3 + 2 * 4 * 25
    assert forward.ops >= 1 and forward.bytes >= 4 * (2 * 3 * 25 + 4 * 3 + 4 + 2 * 4 * 25)
    assert backward.flops == 0 and backward.weight_flops == 2 * (2 * 4 * 25) * 3 + 2 * 4 * 25
    assert backward.bytes >= 4 * (2 * 4 * 25 + 4 * 3 + 4)  # the gradient in, both gradients out
    assert phases[-1].phase == latency.OPTIMIZER and phases[-1].ops > 0


def test_calibration_gives_the_three_slowdowns():
    host = {"matmul_flops_per_s": 4e10, "copy_bytes_per_s": 1e10, "op_overhead_s": 2e-6}
    device = {"matmul_flops_per_s": 1e10, "copy_bytes_per_s": 5e9, "op_overhead_s": 1e-5}
    assert latency.calibrated(host, device) == pytest.approx(latency.Slowdown(4.0, 2.0, 5.0))


def test_run_py_calibrate_measures_positive_constants(capsys):
    assert runner.main(["--calibrate", "--json", "--threads", "1"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["matmul_flops_per_s"] > 1e8 and measured["copy_bytes_per_s"] > 1e8
    assert 0 < measured["op_overhead_s"] < 1e-3


def test_the_shipped_constants_load_for_every_device():
    host = latency.device_constants("host")
    for name in ("pi4", "nano"):
        device = latency.device_constants(name)
        assert device.per_op > 0 and device.per_byte > host.per_byte * 0.1
    with pytest.raises(ValueError, match="valid choices"):
        latency.device_constants("pi5")
    with pytest.raises(ValueError, match="run.py --calibrate"):
        latency.device_constants("pi4", {"matmul_flops_per_s": 1.0})


def test_the_roofline_is_far_below_the_model():
    phases = latency.method_phases("mobilenet_v3_small", "ft-all", None, batch=2, resolution=64)
    from mobiletl_edu.deploy.devices import PI4
    assert latency.predict(phases, latency.device_constants("pi4")) > 5 * latency.roofline(
        phases, PI4.peak_flops_per_s, PI4.peak_bytes_per_s)
