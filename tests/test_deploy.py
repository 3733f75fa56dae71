"""Training bundles and the device runner, on the host's torch (the device stacks: test_deploy_device.py).

Independent truths: the package's own prepared model (same loss, gradients and Adam step as
the runner's rebuilt network), the ``safetensors`` library (it reads the files we write),
torch 1.10.1's API as dumped from the real release (the runner's static check), vermin (the
Python 3.6 floor), and an uninterrupted run (a resumed run must end identically).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mobiletl_edu import ops
from mobiletl_edu.deploy import apicheck, bundle, devices, stacks
from mobiletl_edu.deploy import run as runner
from mobiletl_edu.methods import prepare
from mobiletl_edu.models import build_model
from mobiletl_edu.train import load_trained
from images import colour_folder

RUNNER = Path(runner.__file__)


def warmed_model(name: str, classes: int = 10) -> torch.nn.Module:
    """A randomly initialised model whose BN statistics come from two random batches, so that its
    activations are neither zero nor huge (a fresh one's logits are all equal)."""
    torch.manual_seed(0)
    model = build_model(name, classes)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model


def rebuilt(network: torch.nn.Module) -> torch.nn.Module:
    """The runner's network for a prepared model, its tensors passed through the file format."""
    frozen, trainable = bundle.split_state(network)
    state = {}
    for part in (frozen, trainable):
        state.update(runner.parse_tensors(runner.tensors_bytes(part), "test")[0])
    return runner.build_network({"network": bundle.describe_network(network)}, state, sorted(trainable))


def one_step(network, inputs, targets, lr=1e-3):
    """Loss, gradients and the parameters after one Adam step (dropout drawn from seed 1)."""
    network.train()
    optimizer = runner.make_optimizer(network, lr)
    torch.manual_seed(1)
    optimizer.zero_grad()
    loss = F.cross_entropy(network(inputs), targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.requires_grad}
    optimizer.step()
    return loss.item(), grads, {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}


CASES = [("mobilenet_v3_small", "mobiletl", 3), ("mobilenet_v3_small", "ft-all", None),
         ("mobilenet_v3_small", "ft-bn", None), ("mobilenet_v3_small", "ft-bias", None),
         ("mobilenet_v2", "mobiletl", 2), ("proxyless_mobile", "mobiletl-all-bn", 2),
         ("resnet18", "mobiletl", 2), ("mobilenet_v3_small", "mobiletl+tinytl-lite-residual", 2),
         ("mobilenet_v3_large", "remove-se", 1)]


@pytest.mark.parametrize("name, method, blocks", CASES)
def test_runner_step_equals_the_package_step(name, method, blocks):
    network = prepare(warmed_model(name), method, blocks, num_classes=10, resolution=64).model
    device_network = rebuilt(network)
    assert list(device_network.state_dict()) == list(network.state_dict())
    assert ([n for n, p in device_network.named_parameters() if p.requires_grad]
            == [n for n, p in network.named_parameters() if p.requires_grad])
    torch.manual_seed(2)
    inputs, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    loss, grads, after = one_step(network, inputs, targets)
    device_loss, device_grads, device_after = one_step(device_network, inputs, targets)
    assert device_loss == pytest.approx(loss, rel=1e-6)
    assert 0.5 < loss < 10  # a real loss, not a degenerate network
    for n in grads:
        torch.testing.assert_close(device_grads[n], grads[n], rtol=1e-5, atol=1e-7, msg=n)
        torch.testing.assert_close(device_after[n], after[n], rtol=1e-5, atol=1e-7, msg=n)


def test_runner_keeps_what_the_package_keeps_for_backward():
    """Same operators, same memory: the saved-tensor bytes of a step are equal."""
    from mobiletl_edu.measure import saved_activations
    network = prepare(warmed_model("mobilenet_v3_small"), "mobiletl", 3, num_classes=10).model
    device_network = rebuilt(network)
    inputs, targets = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    ours = saved_activations(network, inputs, targets).total_bytes
    assert saved_activations(device_network, inputs, targets).total_bytes == ours


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1000])
def test_runner_bit_packing_equals_the_package(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = runner.pack_bits(mask)
    assert torch.equal(packed, ops.pack_bits(mask))
    assert torch.equal(runner.unpack_bits(packed, n).bool(), mask)


def test_tensor_files_are_safetensors():
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"w": torch.randn(3, 4), "q": torch.randint(-127, 127, (5,), dtype=torch.int8),
               "n": torch.tensor(7), "m": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    data = runner.tensors_bytes(tensors, {"note": "x"})
    loaded = safetensors.load(data)
    ours, metadata = runner.parse_tensors(data, "test")
    assert metadata == {"note": "x"}
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and torch.equal(ours[name], t) and ours[name].dtype == t.dtype
    theirs = safetensors.save({"w": tensors["w"]})
    assert torch.equal(runner.parse_tensors(theirs, "theirs")[0]["w"], tensors["w"])


def test_the_tensor_layout_is_the_documented_one():
    """Header length (8 bytes, little-endian), JSON header, raw little-endian data, by hand."""
    data = runner.tensors_bytes({"a": torch.tensor([1.0, -2.0])})
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    assert header == {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert data[8 + size:] == bytes.fromhex("0000803f000000c0")


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:7], "too short"), (lambda d: d[:-1], "does not fit its bytes"),
    (lambda d: (10**9).to_bytes(8, "little") + d[8:], "past the end"), (lambda d: d[:8] + b"[" + d[9:], "header")])
def test_malformed_tensor_files_are_refused(damage, message):
    data = runner.tensors_bytes({"a": torch.arange(6.0)})
    with pytest.raises(runner.BundleError, match=message):
        runner.parse_tensors(damage(data), "f")


# ---------------------------------------------------------------------------------------------
# Bundles


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """MobileNetV3-Small from the shipped source checkpoint, mobiletl on 3 blocks, 3 classes, 64 px."""
    out = tmp_path_factory.mktemp("bundles") / "b"
    bundle.write_bundle(out, model="mobilenet_v3_small", method="mobiletl", blocks=3, device="nano",
                        classes=3, weights="source", resolution=64, batch=4, lr=1e-3, epochs=2,
                        class_names=["apple", "banana", "cherry"])
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three classes of eight small images each, told apart by their colour."""
    return colour_folder(tmp_path_factory.mktemp("images"), ["apple", "banana", "cherry"], 8, (40, 52))


def run_here(*argv):
    return runner.main([str(a) for a in argv])


def test_bundle_holds_what_the_manifest_says(small_bundle):
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert sorted(p.name for p in small_bundle.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    for name, digest in manifest["files"].items():
        assert runner.sha256_file(small_bundle / name) == digest
    assert (small_bundle / "run.py").read_bytes() == RUNNER.read_bytes()
    frozen = runner.parse_tensors((small_bundle / "frozen.safetensors").read_bytes(), "f")[0]
    trainable = runner.parse_tensors((small_bundle / "trainable.safetensors").read_bytes(), "t")[0]
    assert {t.dtype for k, t in frozen.items() if k.endswith("weight_int8")} == {torch.int8}
    assert all(t.dtype == torch.float32 for t in trainable.values())
    assert manifest["estimate"]["training_peak_bytes"] < manifest["estimate"]["budget_bytes"]
    assert "nvpmodel" in (small_bundle / "README.md").read_text()


def test_run_py_check_on_the_host(small_bundle):
    done = subprocess.run([sys.executable, str(small_bundle / "run.py"), "--check", "--threads", "1"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and "peak resident" in done.stdout


@pytest.mark.parametrize("tamper, message", [
    (lambda b: (b / "frozen.safetensors").write_bytes(b"\0" + (b / "frozen.safetensors").read_bytes()[1:]),
     "does not match its sha256"),
    (lambda b: (b / "trainable.safetensors").unlink(), "is missing"),
    (lambda b: (b / "manifest.json").write_text("{"), "not valid JSON")])
def test_a_tampered_bundle_is_refused(small_bundle, tmp_path, tamper, message, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(small_bundle, copy)
    tamper(copy)
    assert run_here("--bundle", copy, "--check") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_deploy_refuses_a_peak_over_budget_and_force_overrides(tmp_path):
    out = tmp_path / "big"
    with pytest.raises(ValueError, match="budget is 1 MiB"):
        bundle.write_bundle(out, model="mobilenet_v3_small", method="ft-all", blocks=None, device="pi4",
                            weights="none", resolution=64, budget_mb=1)
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing left behind
    manifest = bundle.write_bundle(out, model="mobilenet_v3_small", method="ft-all", blocks=None, device="pi4",
                                   weights="none", resolution=64, budget_mb=1, force=True)
    assert manifest["estimate"]["forced"] and (out / "manifest.json").is_file()


def test_deploy_never_overwrites_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        bundle.write_bundle(taken, weights="none", resolution=64)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(bundle, "bundle_readme", broken)
    with pytest.raises(OSError, match="disk full"):
        bundle.write_bundle(tmp_path / "new", weights="none", resolution=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_training_peak_is_the_profilers_and_what_a_warm_step_allocates():
    from mobiletl_edu.measure import tensor_step
    from mobiletl_edu.profiler import model_training_peak
    peak = devices.training_peak_bytes("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64)
    assert peak == model_training_peak("mobilenet_v3_small", "mobiletl", 3, batch=2, resolution=64).bytes
    torch.manual_seed(0)
    model, optimizer = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=10, resolution=64)
    step = tensor_step(model, optimizer, torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,)))
    assert abs(peak / (sum(step["state"].values()) + step["step_peak_bytes"]) - 1) <= 0.10  # torch's count
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert peak > step["state"]["parameters"] + 12 * trained  # gradients and Adam's two moments inside
    assert devices.training_peak_bytes("mobilenet_v3_small", "mobiletl", 3, batch=4, resolution=64) > peak


def test_device_profiles():
    assert devices.get_device("pi4").budget_bytes(2) < devices.get_device("pi4").budget_bytes(8)
    with pytest.raises(ValueError, match="2 GB, 4 GB, 8 GB"):
        devices.get_device("pi4").budget_bytes(3)
    with pytest.raises(ValueError, match="valid choices: pi4, nano, host"):
        devices.get_device("pi5")
    assert any("2.10.0" in p and "SIGILL" in p for p in devices.PI4.pitfalls)


def test_describe_refuses_a_layer_the_runner_lacks():
    with pytest.raises(ValueError, match="no such layer"):
        bundle.describe_module(torch.nn.GELU())


# ---------------------------------------------------------------------------------------------
# The runner training on an image folder, resuming, predicting; and the way back


def checkpoint_state(folder: Path) -> dict:
    return runner.load_checkpoint(str(folder / runner.CHECKPOINT_FILE))[0]


def test_runner_trains_resumes_exactly_and_predicts(small_bundle, image_folder, tmp_path, capsys):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", whole, "--epochs", 2) == 0
    assert "epoch 2 done" in capsys.readouterr().out
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", split, "--epochs", 2,
                    "--max-steps", 3) == 0
    assert "stopped after --max-steps 3" in capsys.readouterr().out
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", split, "--epochs", 2) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", split, "--resume") == 0
    assert "resuming" in capsys.readouterr().out
    a, b = checkpoint_state(whole), checkpoint_state(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert run_here("--bundle", small_bundle, "--predict", image_folder / "cherry" / "0.png", "--out", whole) == 0
    assert "fine-tuned on the device" in capsys.readouterr().out


def test_runner_refuses_a_corrupt_checkpoint_and_other_classes(small_bundle, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", out, "--epochs", 1,
                    "--max-steps", 1) == 0
    path = out / runner.CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", out, "--resume") == 2
    assert "corrupt" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(image_folder, other)
    (other / "apple").rename(other / "avocado")
    assert run_here("--bundle", small_bundle, "--data", other, "--out", tmp_path / "x") == 2
    assert "the bundle was made for" in capsys.readouterr().err


def test_import_bundle_gives_a_run_that_load_trained_reads(small_bundle, image_folder, tmp_path):
    trained = tmp_path / "trained"
    assert run_here("--bundle", small_bundle, "--data", image_folder, "--out", trained, "--epochs", 1) == 0
    out = bundle.import_bundle(small_bundle, tmp_path / "run", checkpoint=trained / runner.CHECKPOINT_FILE)
    model, config = load_trained(out)
    assert (config.model, config.method, config.blocks) == ("mobilenet_v3_small", "mobiletl", 3)
    device = runner.Bundle(str(small_bundle))
    device.load_trained(str(trained))
    device.network.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), device.network(x), rtol=1e-5, atol=1e-6)
    record = json.loads((out / "config.json").read_text())
    assert record["imported_from"]["trained_on_device"] and record["class_names"] == ["apple", "banana", "cherry"]
    with pytest.raises(FileExistsError):
        bundle.import_bundle(small_bundle, out)


# ---------------------------------------------------------------------------------------------
# Static checks: the Python 3.6 floor and the torch 1.10 API


def vermin(path: Path):
    return subprocess.run([str(Path(sys.executable).with_name("vermin")), "--no-tips", "-t=3.6-", "--violations",
                           "--eval-annotations", str(path)], capture_output=True, text=True)


def test_runner_parses_on_python_3_6():
    done = vermin(RUNNER)
    assert done.returncode == 0, done.stdout + done.stderr


def test_torch_api_dump_parses_on_python_3_6():
    done = vermin(RUNNER.with_name("torch_api_dump.py"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_vermin_catches_what_python_3_6_lacks(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import dataclasses\n\n\ndef f(x: list[int]) -> int | None:\n    if (n := len(x)):\n"
                   "        return n\n")
    done = vermin(bad)
    assert done.returncode != 0
    assert "dataclasses" in done.stdout and "named expressions" in done.stdout


def test_the_pi_stack_lock_pins_every_runtime_dependency():
    """`make device-test` installs the package on the Pi stack from its lock alone (--no-deps):
    every runtime requirement in pyproject.toml, as pip evaluates it on a Pi 4, needs a pin
    that satisfies it. Checked here, without the stack, so CI sees a new dependency."""
    import tomllib

    from packaging.requirements import Requirement

    requirements = tomllib.loads((RUNNER.parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = dict(line.split("==") for line in stacks.pins("pi4-arm64"))
    pinned = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    pi = {"platform_machine": "aarch64", "sys_platform": "linux", "python_version": "3.11",
          "python_full_version": "3.11.2", "platform_system": "Linux", "implementation_name": "cpython",
          "os_name": "posix", "extra": ""}
    unmet = []
    for requirement in map(Requirement, requirements):
        if requirement.marker is not None and not requirement.marker.evaluate(pi):
            continue
        version = pinned.get(requirement.name.lower().replace("_", "-"))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            unmet.append(f"{requirement} (lock: {version})")
    assert not unmet, "locks/pi4-arm64.txt does not satisfy: " + "; ".join(unmet)


def test_runner_uses_only_torch_1_10_api():
    allowed = apicheck.load_allow_list()
    assert allowed["torch"].startswith("1.10.1")
    assert apicheck.check_file(RUNNER) == []


def test_the_api_check_catches_newer_torch():
    source = ("import torch\nimport torch.nn.functional as F\nx = torch.zeros(2)\nx.untyped_storage()\n"
              "torch.load('f', weights_only=True)\nF.scaled_dot_product_attention(x, x, x)\ntorch.compile(x)\n")
    found = "\n".join(apicheck.violations(source))
    for newer in ("untyped_storage", "weights_only", "scaled_dot_product_attention", "torch.compile"):
        assert newer in found


# ---------------------------------------------------------------------------------------------
# The command line: deploy, bench, import-bundle


def cli(*argv):
    return subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", *map(str, argv)], capture_output=True,
                          text=True)


def test_cli_deploy_refuses_over_budget_then_writes_and_imports(tmp_path):
    common = ["deploy", "--device", "pi4", "--classes", "2", "--weights", "none", "--resolution", "32",
              "--out", tmp_path / "b", "--threads", "1"]
    done = cli(*common, "--budget-mb", "1")
    assert done.returncode == 2 and "budget is 1 MiB" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()
    done = cli(*common)
    assert done.returncode == 0, done.stderr
    assert "training peak (analytic)" in done.stdout and (tmp_path / "b" / "run.py").is_file()
    done = cli("import-bundle", tmp_path / "b", "--out", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    model, config = load_trained(tmp_path / "run")
    assert config.method == "mobiletl" and config.blocks == 3


def test_cli_bench_reports_every_method_and_predictions():
    done = cli("bench", "--methods", "ft-all,mobiletl", "--steps", "2", "--warmup", "1", "--resolution", "32",
               "--threads", "1", "--predict", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert list(report["results"]) == ["ft-all", "mobiletl-3"]
    assert report["results"]["ft-all"]["steps"] == 2 and report["results"]["ft-all"]["ratio_to_first"] == 1
    assert set(report["predicted_s"]["mobiletl-3"]) == {"pi4", "nano"}
    done = cli("bench", "--methods", "ft-all,nope")
    assert done.returncode == 2 and "unknown method 'nope'" in done.stderr
