"""The bundle runner and the package on the devices' own software stacks (``make device-test``).

Stacks (``mobiletl_edu.deploy.stacks``, built into a cache outside the repository):
``nano-py36`` (Python 3.6.15 + torch 1.10.1, native), ``nano-arm64`` (bullseye arm64 + torch
1.10.2 under qemu's Cortex-A57) and ``pi4-arm64`` (bookworm arm64, Python 3.11 + torch 2.14.1
under qemu's Cortex-A72). A stack that is not built skips its tests; ``make device-test``
builds them all first. Emulated steps are slow (seconds each), so the images are small.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobiletl_edu.deploy import bundle, stacks
from mobiletl_edu.deploy import run as runner
from images import colour_folder
from test_deploy import one_step

pytestmark = pytest.mark.device
REPO = Path(__file__).resolve().parents[1]
NANO_STACKS = ("nano-py36", "nano-arm64")
CLASSES = ("apple", "banana", "cherry")


def on_stack(name: str, argv, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    if not stacks.is_built(name):
        pytest.skip(f"stack {name} is not built (make device-test builds it)")
    command, stack_env = stacks.python_command(name)
    started = time.perf_counter()
    done = subprocess.run(command + [str(a) for a in argv], env={**stack_env, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    print(f"[{name}] {' '.join(str(a) for a in argv)[-80:]}: {time.perf_counter() - started:.1f} s")
    return done


@pytest.fixture(scope="module")
def device_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device") / "bundle"
    bundle.write_bundle(out, model="mobilenet_v3_small", method="mobiletl", blocks=3, device="nano", classes=3,
                        weights="source", resolution=48, batch=4, lr=1e-3, epochs=1, class_names=list(CLASSES))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three classes of three 40x40 images, told apart by their colour."""
    return colour_folder(tmp_path_factory.mktemp("device-images"), CLASSES, 3, (40, 40))


@pytest.mark.parametrize("stack", NANO_STACKS)
def test_runner_step_equals_the_package_step_on_the_nano_stack(stack, device_bundle, tmp_path):
    torch.manual_seed(3)
    inputs, targets = torch.randn(4, 3, 48, 48), torch.randint(0, 3, (4,))
    (tmp_path / "batch.safetensors").write_bytes(runner.tensors_bytes({"inputs": inputs, "targets": targets}))
    network = bundle.bundle_model(device_bundle)[0]
    before = {n: p.detach().clone() for n, p in network.named_parameters() if p.requires_grad}
    loss, grads, _ = one_step(network, inputs, targets)
    done = on_stack(stack, [REPO / "tests" / "device_step.py", device_bundle, tmp_path / "batch.safetensors",
                            tmp_path / "out.safetensors"])
    assert done.returncode == 0, done.stderr[-2000:]
    theirs, metadata = runner.parse_tensors((tmp_path / "out.safetensors").read_bytes(), "out")
    assert metadata["torch"].startswith("1.10")
    assert abs(float(metadata["loss"]) - loss) <= 1e-5 * abs(loss), (metadata["loss"], loss)
    for n in grads:  # float rounding of two torch builds: about 1e-9 where gradients reach 1e-2
        torch.testing.assert_close(theirs["grad." + n], grads[n], rtol=1e-4, atol=1e-7, msg=n)
    # Adam divides by |gradient| + 1e-8, so where a gradient is ~1e-9 those rounding differences
    # move the update by up to a few % of the learning rate: check the device's Adam step on
    # the device's own gradients instead.
    params = {n: p.clone().requires_grad_() for n, p in before.items()}
    for n, p in params.items():
        p.grad = theirs["grad." + n]
    torch.optim.Adam(list(params.values()), lr=1e-3).step()
    for n, p in params.items():
        torch.testing.assert_close(theirs["param." + n], p.detach(), rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("stack", NANO_STACKS)
def test_runner_trains_resumes_and_refuses_tampering_on_the_nano_stack(stack, device_bundle, images, tmp_path):
    run_py = device_bundle / "run.py"
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = ["--data", images, "--epochs", 1, "--threads", 1, "--print-every", 1]
    done = on_stack(stack, [run_py, *common, "--out", whole])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1 done" in done.stdout and "peak resident" in done.stdout
    done = on_stack(stack, [run_py, *common, "--out", split, "--max-steps", 2])
    assert done.returncode == 0 and "stopped after --max-steps 2" in done.stdout, done.stderr[-2000:]
    done = on_stack(stack, [run_py, *common, "--out", split, "--resume"])
    assert done.returncode == 0 and "resuming" in done.stdout, done.stderr[-2000:]
    a = runner.load_checkpoint(str(whole / runner.CHECKPOINT_FILE))[0]
    b = runner.load_checkpoint(str(split / runner.CHECKPOINT_FILE))[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    tampered = tmp_path / "tampered"
    shutil.copytree(device_bundle, tampered)
    data = bytearray((tampered / "trainable.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "trainable.safetensors").write_bytes(bytes(data))
    done = on_stack(stack, [tampered / "run.py", "--check"])
    assert done.returncode == 2 and "does not match its sha256" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------
# The Raspberry Pi 4 stack: the package itself


A72_PROBE = ("import torch, torch.nn.functional as F\n"
             "x = torch.randn(2, 3, 16, 16, requires_grad=True)\n"
             "F.conv2d(x, torch.randn(4, 3, 3, 3)).sum().backward()\n"
             "q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)\n"
             "print('ok', torch.__version__, x.grad.shape, q.int_repr().dtype)\n")


def test_torch_survives_the_cortex_a72():
    """Import, a conv forward and backward, and a quantized op: the SIGILL releases die here."""
    done = on_stack("pi4-arm64", ["-c", A72_PROBE])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("ok 2.14.1")


def test_the_emulated_a72_catches_a_sigill_release():
    """torch 2.10.0 dies with an illegal instruction on a real Pi 4 (pytorch#176993): so here."""
    done = on_stack("pi4-torch2.10", ["-c", A72_PROBE])
    assert done.returncode == -signal.SIGILL, (done.returncode, done.stdout, done.stderr[-500:])


@pytest.fixture(scope="module")
def pi_site(tmp_path_factory) -> Path:
    """The package built as a wheel from this checkout and installed for Python 3.11 on aarch64."""
    if not stacks.is_built("pi4-arm64"):
        pytest.skip("stack pi4-arm64 is not built (make device-test builds it)")
    work = tmp_path_factory.mktemp("pi-package")
    source = work / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "mobiletl_edu", source / "mobiletl_edu",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    work / "dist", source], check=True)
    wheel = next((work / "dist").glob("mobiletl_edu-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", work / "site",
                    "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
                    "--only-binary=:all:", wheel], check=True)
    return work / "site"


def test_the_package_installs_on_the_pi_stack(pi_site):
    """Its metadata's runtime requirements are all met by the stack's locked aarch64 wheels."""
    probe = ("from importlib.metadata import requires, version\n"
             "from packaging.requirements import Requirement\n"
             "bad = []\n"
             "for line in requires('mobiletl-edu'):\n"
             "    r = Requirement(line)\n"
             "    if r.marker is None or r.marker.evaluate({'extra': ''}):\n"
             "        if not r.specifier.contains(version(r.name), prereleases=True):\n"
             "            bad.append((line, version(r.name)))\n"
             "print('unmet', bad)\n"
             "import mobiletl_edu.cli\n")
    done = on_stack("pi4-arm64", ["-c", probe], env={"PYTHONPATH": f"{pi_site}:/opt/site"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unmet []" in done.stdout


def test_mobiletl_edu_train_runs_on_the_pi_stack(pi_site, tmp_path):
    done = on_stack("pi4-arm64", ["-m", "mobiletl_edu.cli", "train", "--epochs", "1", "--limit", "24",
                                  "--resolution", "32", "--threads", "1", "--quiet", "--out", tmp_path / "run"],
                    env={"PYTHONPATH": f"{pi_site}:/opt/site", "MPLCONFIGDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test top-1" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["config"]["method"] == "mobiletl"


def test_a_bundle_trains_on_the_pi_stack(device_bundle, images, tmp_path):
    done = on_stack("pi4-arm64", [device_bundle / "run.py", "--data", images, "--epochs", "1", "--threads", "1",
                                  "--out", tmp_path / "train"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1 done" in done.stdout
    tensors, state = runner.load_checkpoint(str(tmp_path / "train" / runner.CHECKPOINT_FILE))
    assert state["torch"].startswith("2.14.1") and state["progress"]["epoch"] == 1


def test_stacks_are_outside_the_repository():
    for name in stacks.STACKS:
        where = stacks.location(name).resolve()
        assert REPO not in where.parents and "shared" not in where.parts


def test_the_committed_torch_1_10_allow_list_is_what_torch_1_10_1_says():
    """apicheck's allow-list, dumped again from the Python 3.6 + torch 1.10.1 stack, is unchanged."""
    done = on_stack("nano-py36", [REPO / "mobiletl_edu" / "deploy" / "torch_api_dump.py"])
    assert done.returncode == 0, done.stderr[-2000:]
    committed = json.loads((REPO / "mobiletl_edu" / "deploy" / "torch110_api.json").read_text())
    assert json.loads(done.stdout) == committed
