"""The two devices' software stacks, rebuilt on this machine so that tests need no device.

* ``nano-py36``: Python 3.6.15 (pyenv) with torch 1.10.1 and Pillow, x86_64, native speed:
  the Jetson Nano's Python and torch API (JetPack 4.6 ships Python 3.6, NVIDIA's torch 1.10).
* ``nano-arm64``: Debian bullseye arm64 with torch 1.10.2 under ``qemu-aarch64-static`` with
  the Nano's core (Cortex-A57): its instruction set and an aarch64 torch 1.10 build.
* ``pi4-arm64``: Debian bookworm arm64 (Raspberry Pi OS's base, Python 3.11) with torch 2.14.1
  and the package's own dependencies, under qemu with the Pi 4's core (Cortex-A72).
* ``pi4-torch2.10``: the same with torch 2.10.0, which dies with SIGILL on the A72: the
  emulation must catch it, as a real Pi 4 does.

No stack has more than it needs: torch and Pillow for the Nano runner (no numpy, no
torchvision), the package's locked dependencies for the Pi. Every package is pinned exactly in
``locks/<stack>.txt`` and installed with ``--no-deps``; a stack is built once into
``$XDG_CACHE_HOME/mobiletl-edu/stacks/<stack>-<key>/`` (key: a hash of its recipe and lock)
and reused until either changes. ``python -m mobiletl_edu.deploy.stacks build`` builds them
(``make device-test`` does). Facts and recipes: ``shared/research/deploy.md``, section 6.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

LOCKS = Path(__file__).resolve().parent / "locks"
PYENV_PYTHON36 = "3.6.15"
# The sysroot's /sys/devices/system/cpu/{possible,present}: both devices have four cores. Without
# these files torch's cpuinfo reads the host's and crashes; empty, it fails to initialize and
# torch 1.10 aborts in the thread pool that its no-grad convolutions use on aarch64.
CPU_LIST = "0-3"
# every manylinux tag pip must accept for aarch64 wheels (nvidia-cudnn is _2_27, nccl _2_18)
MANYLINUX_AARCH64 = [f"manylinux_2_{n}_aarch64" for n in range(36, 16, -1)] + ["manylinux2014_aarch64"]


class Stack(NamedTuple):
    name: str
    device: str  # the device profile it stands in for (devices.DEVICES)
    what: str
    suite: str | None  # Debian suite of the arm64 sysroot; None: a native pyenv venv
    python: str  # interpreter path inside the sysroot, or the pyenv version
    python_tag: str  # cp36, cp39, cp311: for the wheels
    qemu_cpu: str | None


STACKS = {
    "nano-py36": Stack("nano-py36", "nano", "Python 3.6.15 + torch 1.10.1 (x86_64, native)",
                       None, PYENV_PYTHON36, "cp36", None),
    "nano-arm64": Stack("nano-arm64", "nano", "Debian bullseye arm64, Python 3.9 + torch 1.10.2, "
                        "qemu Cortex-A57", "bullseye", "/usr/bin/python3.9", "cp39", "cortex-a57"),
    "pi4-arm64": Stack("pi4-arm64", "pi4", "Debian bookworm arm64, Python 3.11 + torch 2.14.1 and the "
                       "package's dependencies, qemu Cortex-A72", "bookworm", "/usr/bin/python3.11", "cp311",
                       "cortex-a72"),
    "pi4-torch2.10": Stack("pi4-torch2.10", "pi4", "Debian bookworm arm64, Python 3.11 + torch 2.10.0 (a SIGILL "
                           "release on the A72), qemu Cortex-A72", "bookworm", "/usr/bin/python3.11", "cp311",
                           "cortex-a72"),
}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobiletl-edu" / "stacks"


def lock_file(name: str) -> Path:
    return LOCKS / f"{name}.txt"


def pins(name: str) -> list[str]:
    """The exact ``name==version`` lines of a stack's lock file."""
    lines = [line.split("#", 1)[0].strip() for line in lock_file(name).read_text().splitlines()]
    return [line for line in lines if line]


def _stack(name: str) -> Stack:
    if name not in STACKS:
        raise ValueError(f"unknown stack {name!r}; valid choices: {', '.join(STACKS)}")
    return STACKS[name]


def location(name: str) -> Path:
    """Where the stack lives: keyed on its recipe and its lock, so a change builds a new one."""
    stack = _stack(name)
    key = hashlib.sha256(json.dumps([stack, pins(name), MANYLINUX_AARCH64, CPU_LIST]).encode()).hexdigest()[:12]
    return cache_root() / f"{name}-{key}"


def is_built(name: str) -> bool:
    return (location(name) / ".complete").is_file()


def _run(command, **kwargs) -> None:
    print("+ " + " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, **kwargs)


def _pyenv_python36() -> Path:
    pyenv = shutil.which("pyenv") or str(Path.home() / ".pyenv" / "bin" / "pyenv")
    try:
        prefix = subprocess.run([pyenv, "prefix", PYENV_PYTHON36], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"the nano-py36 stack needs Python {PYENV_PYTHON36} from pyenv "
                           f"(`pyenv install {PYENV_PYTHON36}`): {error}") from error
    return Path(prefix.stdout.strip()) / "bin" / "python3.6"


def _debian_mirror() -> str:
    """The machine's own Debian mirror (its ``URIs:`` line), else deb.debian.org."""
    for path in glob.glob("/etc/apt/sources.list.d/*.sources"):
        for line in Path(path).read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    return "http://deb.debian.org/debian"


def _build_venv(stack: Stack, where: Path) -> None:
    _run([_pyenv_python36(), "-m", "venv", where])
    python = where / "bin" / "python"
    lock = pins(stack.name)
    pip = [p for p in lock if p.startswith("pip==")]
    _run([python, "-m", "pip", "install", "--no-deps", *pip])
    _run([python, "-m", "pip", "install", "--no-deps", "--only-binary=:all:",
          *[p for p in lock if not p.startswith("pip==")]])


def _build_sysroot(stack: Stack, where: Path) -> None:
    for tool in ("debootstrap", "qemu-aarch64-static", "dpkg"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise RuntimeError(f"the {stack.name} stack needs {tool}: apt-get install qemu-user-static debootstrap")
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    # no emulated second stage: unpack the downloaded packages ourselves
    _run([debootstrap, "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3", stack.suite, where,
          _debian_mirror()])
    for deb in sorted(glob.glob(str(where / "var/cache/apt/archives/*.deb"))):
        _run(["dpkg", "-x", deb, where], stdout=subprocess.DEVNULL)
    cpu = where / "sys/devices/system/cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present"):
        (cpu / name).write_text(CPU_LIST + "\n")
    platforms = [arg for tag in MANYLINUX_AARCH64 for arg in ("--platform", tag)]
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", where / "opt/site", *platforms,
          "--python-version", stack.python_tag[2:3] + "." + stack.python_tag[3:], "--implementation", "cp",
          "--abi", stack.python_tag, "--abi", "abi3", "--abi", "none", "--only-binary=:all:", *pins(stack.name)])
    shutil.rmtree(where / "opt/site/triton", ignore_errors=True)  # GPU compiler: 0.8 GB nothing here uses
    shutil.rmtree(where / "var/cache/apt/archives", ignore_errors=True)


def build(name: str) -> Path:
    """Build the stack ``name`` unless it is already built; return where it lives."""
    stack, where = _stack(name), location(name)
    if is_built(name):
        print(f">> {name}: reusing {where}")
        return where
    started = time.time()
    partial = where.with_name(where.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    (_build_venv if stack.suite is None else _build_sysroot)(stack, partial)
    shutil.rmtree(where, ignore_errors=True)
    partial.rename(where)  # a venv survives the move: we only ever run its bin/python
    (where / ".complete").write_text(json.dumps({"pins": pins(name), "seconds": round(time.time() - started)}))
    print(f">> {name}: built in {time.time() - started:.0f} s at {where}")
    return where


def python_command(name: str, *, threads: int = 1) -> tuple[list[str], dict]:
    """(argv prefix, environment) that run a Python script on the stack ``name``.

    Under qemu the sysroot answers every absolute path it has (``-L``), the host the rest,
    so scripts and data in the host's temporary folders are reachable as they are.
    """
    stack, where = _stack(name), location(name)
    if not is_built(name):
        raise FileNotFoundError(f"stack {name} is not built: run `make device-test` or "
                                f"`python -m mobiletl_edu.deploy.stacks build {name}`")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads), "HOME": os.environ.get("HOME", "/tmp"),
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    if stack.suite is None:
        return [str(where / "bin" / "python")], env
    env.update(QEMU_CPU=stack.qemu_cpu, PYTHONPATH="/opt/site")
    return ["qemu-aarch64-static", "-L", str(where), str(where) + stack.python], env


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("build", "where"):
        print("usage: python -m mobiletl_edu.deploy.stacks build|where [STACK ...]", file=sys.stderr)
        return 2
    names = argv[1:] or list(STACKS)
    for name in names:
        print(build(name) if argv[0] == "build" else location(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
