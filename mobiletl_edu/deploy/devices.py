"""The two devices of the paper's Table 6, and the host, as profiles the deploy step reads.

A profile says what the device is (cores, memory, accelerator), what software it runs and how
to install it, what is known to go wrong there, how much memory a training run may use, and the
constants of the latency model (:mod:`mobiletl_edu.deploy.latency`). Facts are from
``shared/research/deploy.md`` with its sources; memory reserves for the operating system are
our assumption, stated as such, and ``--budget-mb`` overrides them.
"""
from __future__ import annotations

from typing import NamedTuple

from ..choices import DEVICE_NAMES, check_choice
from ..models import check_positive

GB = 1024**3
MB = 1024**2


class DeviceProfile(NamedTuple):
    name: str
    title: str
    cores: str
    accelerator: str | None
    processor: str  # what runs a training step: "cpu" or "gpu" (the latency model's TIED)
    memory_gb: tuple  # the variants sold
    default_memory_gb: int
    os_reserve_bytes: int  # left to the operating system and its services (our assumption)
    runtime_bytes: int  # Python, torch and the runner, beside the step itself (book/data/table6_ours.json)
    software: str
    runs: str  # "package": install mobiletl-edu there; "bundle": only the bundle's run.py
    torch: str  # the torch to use there
    install: tuple  # shell steps
    pitfalls: tuple
    peak_compute: str  # the spec-sheet peaks, for the roofline that misses (latency chapter)
    peak_flops_per_s: float
    peak_bytes_per_s: float

    def budget_bytes(self, memory_gb: int | None = None) -> int:
        """What a training run may use: the memory minus the OS reserve and the runtime."""
        memory_gb = self.default_memory_gb if memory_gb is None else memory_gb
        if memory_gb not in self.memory_gb:
            raise ValueError(f"{self.title} comes with {', '.join(f'{m} GB' for m in self.memory_gb)}, "
                             f"not {memory_gb} GB")
        return memory_gb * GB - self.os_reserve_bytes - self.runtime_bytes


PI4 = DeviceProfile(
    name="pi4",
    title="Raspberry Pi 4 Model B",
    cores="4x Arm Cortex-A72 at 1.5 GHz (no LSE atomics, no SVE)",
    accelerator=None,
    processor="cpu",
    memory_gb=(2, 4, 8),
    default_memory_gb=4,  # Table 6's Pi
    os_reserve_bytes=512 * MB,  # Raspberry Pi OS Lite 64-bit, headless (our assumption)
    runtime_bytes=768 * MB,  # run.py on torch 2.14.1's CUDA build: 780-920 MB resident at batch 8
    software="Raspberry Pi OS 64-bit (Debian 12 bookworm, arm64), Python 3.11, PyTorch's aarch64 wheels",
    runs="package",
    torch="torch==2.14.1 torchvision==0.29.1 (tested under qemu's Cortex-A72 model)",
    install=(
        "sudo apt-get install -y python3-venv",
        "python3 -m venv ~/mobiletl && . ~/mobiletl/bin/activate",
        "pip install torch==2.14.1 torchvision==0.29.1   # about 5 GB: a CUDA build since 2.11",
        "pip install mobiletl-edu  # or, for a bundle, nothing more: python3 run.py --check",
    ),
    pitfalls=(
        "A 64-bit OS is required: PyTorch publishes no 32-bit Arm wheels.",
        "Some torch releases die with SIGILL (illegal instruction) on the Cortex-A72, which lacks the LSE "
        "atomics they were built for: 2.0.0 (pytorch#97226), 1.13 Conv2d (#90535), 2.4.0 at import (#132032), "
        "2.6.0 in jit/ONNX export (#146792), 2.10.0 (#176993, fixed in 2.11). Pin a release you have tested, "
        "and run `python3 run.py --check` after every upgrade.",
        "PyPI's aarch64 torch is a CUDA 13 build since 2.11: `pip install torch` pulls about 5 GB of NVIDIA "
        "libraries that a Pi cannot use (import torch loads them anyway); 2.10.0, the last CPU-only "
        "aarch64 wheel on PyPI, is one of the SIGILL releases.",
        "The Pi throttles from 1.5 GHz to 600 MHz when hot: fit a heatsink or fan, run headless, and check "
        "`vcgencmd measure_temp` and `vcgencmd get_throttled` around a benchmark.",
        "Time with 4 threads (torch.set_num_threads(4), OMP_NUM_THREADS=4); two threads give steadier but "
        "slower steps.",
    ),
    peak_compute="4 cores x 1.5 GHz x 8 fp32 FLOPs (NEON FMA) = 48 GFLOP/s; STREAM about 5.5 GB/s",
    peak_flops_per_s=48e9,
    peak_bytes_per_s=5.5e9,
)

NANO = DeviceProfile(
    name="nano",
    title="NVIDIA Jetson Nano",
    cores="4x Arm Cortex-A57 at 1.43 GHz + 128-core Maxwell GPU at 921.6 MHz",
    accelerator="128-core Maxwell GPU (CUDA 10.2), memory shared with the CPU",
    processor="gpu",  # Table 6's Nano row names the GPU
    memory_gb=(2, 4),
    default_memory_gb=4,  # Table 6's Nano
    os_reserve_bytes=1536 * MB,  # JetPack 4.6's Ubuntu desktop and CUDA context (our assumption)
    runtime_bytes=384 * MB,  # run.py on torch 1.10.1 (Python 3.6): 340-450 MB resident at batch 8
    software="JetPack 4.6.x (Ubuntu 18.04, Python 3.6, CUDA 10.2, cuDNN 8.2.1), NVIDIA's torch 1.10.0 wheel",
    runs="bundle",
    torch="torch 1.10.0 (NVIDIA's cp36 wheel for JetPack 4.6)",
    install=(
        "sudo nvpmodel -m 0 && sudo jetson_clocks   # MAXN: 4 cores at 1479 MHz, GPU at 921.6 MHz",
        "sudo apt-get install -y python3-pip libopenblas-base libopenmpi-dev",
        "wget https://nvidia.box.com/shared/static/fjtbno0vpo676a25cgvuqc1wty0fkkg6.whl "
        "-O torch-1.10.0-cp36-cp36m-linux_aarch64.whl",
        "pip3 install Cython numpy pillow torch-1.10.0-cp36-cp36m-linux_aarch64.whl",
        "python3 run.py --check   # in the bundle folder",
    ),
    pitfalls=(
        "JetPack 4.6 is the Nano's last release: Python 3.6 and torch 1.10 (1.11 at most), so the package "
        "itself cannot be installed there; the bundle's run.py needs only torch and Pillow.",
        "PyPI's aarch64 torch wheels do not help: they have no CUDA and need a newer glibc than Ubuntu 18.04's.",
        "torchvision 0.11 must be built from source there (about an hour); run.py does not need it.",
        "Maxwell has no fast int8: the int8 frozen bottom saves memory, not time, on the GPU.",
        "Memory is shared by the CPU and the GPU: watch it with `tegrastats --interval 100` or jtop.",
        "Time after `sudo nvpmodel -m 0 && sudo jetson_clocks`; run.py synchronizes CUDA around each step.",
    ),
    peak_compute="GPU: 128 cores x 921.6 MHz x 2 = 236 fp32 GFLOP/s (472 fp16); LPDDR4 25.6 GB/s",
    peak_flops_per_s=236e9,
    peak_bytes_per_s=25.6e9,
)

HOST = DeviceProfile(
    name="host",
    title="this machine",
    cores="the host's CPU cores",
    accelerator=None,
    processor="cpu",
    memory_gb=(16, 24, 32, 64),
    default_memory_gb=24,
    os_reserve_bytes=2 * GB,
    runtime_bytes=400 * MB,
    software="Python >= 3.10, torch 2.1 to 2.14 (the package's own requirements)",
    runs="package",
    torch="torch==2.14.1 torchvision==0.29.1",
    install=("make setup",),
    pitfalls=(),
    peak_compute="not used",
    peak_flops_per_s=0.0,
    peak_bytes_per_s=0.0,
)

DEVICES = {d.name: d for d in (PI4, NANO, HOST)}
assert tuple(DEVICES) == DEVICE_NAMES, "mobiletl_edu.choices.DEVICE_NAMES lists the profiles"


def get_device(name: str) -> DeviceProfile:
    check_choice("device", name, DEVICE_NAMES)
    return DEVICES[name]


def training_peak_bytes(model, method: str, blocks: int | None = None, *, batch: int = 8, resolution: int = 224,
                        classes: int = 10) -> int:
    """The analytic peak of one training step as the bundle runs it (frozen bottom optimized).

    The profiler's ``training_peak``: every tensor alive at once, phase by phase (parameters,
    buffers, Adam's state, the batch, gradients, stored activations and kernel temporaries),
    with the CPU kernels this process's thread count picks (chapter 8).
    """
    from ..profiler import model_training_peak

    check_positive(batch=batch, resolution=resolution, classes=classes)
    return model_training_peak(model, method, blocks, batch=batch, resolution=resolution, classes=classes).bytes
