"""Fine-tuning runs: the paper's recipe, with checkpoints that resume bit for bit.

The recipe is TinyTL's, which MobileTL follows (NOTES.md, "Training recipe"): Adam, a cosine
annealed learning rate, batch 8, cross-entropy with label smoothing, and the learning rate and
smoothing of each dataset from :func:`mobiletl_edu.data.recipe`. ``prepare`` decides what trains.

A run lives in one directory::

    config.json    what was asked for (every default filled in) and where the weights came from
    checkpoint.pt  model, optimizer, scheduler, RNG states, data order and metrics; replaced
                   atomically after every epoch, so it always holds the last good epoch
    metrics.json   one row per epoch (loss, top-1, time, stored activations, peak memory)
    metrics.csv    the same rows as a table
    summary.json   written when the last epoch is done

Every epoch draws its randomness (data order, augmentation, dropout) from generators seeded by
``(seed, epoch, rank)`` alone, so an interrupted run resumed from its checkpoint ends exactly
where an uninterrupted one does, with or without data-loader workers or several processes.

Weights (``--weights``): ``imagenet`` (torchvision's, from the local torch hub cache or
downloaded with ``download=True``), ``source`` (the checkpoint shipped in ``assets/``, made by
:mod:`mobiletl_edu.pretrain` on the offline source task), ``none`` (random initialisation), or
the path of a plain ``state_dict`` file. Its classifier is replaced by a new one for the target's
classes: that is transfer learning.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import io
import json
import os
import pickle
import math
import random
import re
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torchvision
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm import tqdm

from .choices import (CUSTOM_DATASET, DATASET_NAMES, DEFAULT_BLOCKS, DEFAULT_DATASET, METHODS, MODEL_NAMES,  # noqa: F401
                      OFFLINE_DATASETS, PRECISIONS, SOURCE_DATASET, WEIGHT_NAMES, check_choice)
from .data import build_datasets, recipe
from .measure import max_rss_bytes, reset_peak_rss, resident_bytes, saved_activations
from .methods import BLOCK_METHODS, check_bottom_chunk, prepare
from .models import build_model, check_positive, find_units, set_submodule

ASSETS = Path(__file__).resolve().parent / "assets"
SOURCE_MODEL = "mobilenet_v3_small"
SOURCE_CHECKPOINT = ASSETS / "offline_source_mobilenet_v3_small.pt"

PAPER_EPOCHS, PAPER_RESOLUTION, PAPER_BATCH_SIZE = 50, 224, 8
OFFLINE_EPOCHS, OFFLINE_RESOLUTION = 3, 64  # fits the 2-minute CPU demo (benchmarks/offline_accuracy.py)
EVAL_BATCH_SIZE = 64
RUN_FORMAT = "mobiletl-edu-run"


class TrainingDiverged(ValueError):
    """The loss (or a weight) became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a run's result. ``None`` means "the default for this dataset"."""

    model: str = "mobilenet_v3_small"
    method: str = "mobiletl"
    blocks: int | None = None  # block-wise methods: DEFAULT_BLOCKS; global methods: must stay None
    dataset: str = DEFAULT_DATASET
    weights: str | None = None  # offline-target: "source"; offline-source: "none"; else "imagenet"
    epochs: int | None = None  # offline: OFFLINE_EPOCHS; else the paper's 50
    seed: int = 0
    batch_size: int = PAPER_BATCH_SIZE
    lr: float | None = None  # data.recipe(dataset)
    label_smoothing: float | None = None  # data.recipe(dataset)
    resolution: int | None = None  # offline: OFFLINE_RESOLUTION; else 224
    frozen_precision: str = "int8"
    bn_momentum: float | None = None  # BatchNorm running-statistics momentum; None keeps the model's
    deterministic: bool = True
    workers: int = 0  # data-loader processes (the result does not depend on it)
    limit: int | None = None  # train and test on a fixed random subset of this many images (smoke tests)
    bottom_chunk: int | None = None  # run the frozen bottom this many samples at a time (methods.set_bottom_chunk)

    def resolved(self) -> TrainConfig:
        """Check every value and fill in the dataset's defaults."""
        check_choice("model", self.model, MODEL_NAMES)
        check_choice("method", self.method, METHODS)
        check_choice("dataset", self.dataset, (*DATASET_NAMES, CUSTOM_DATASET))
        check_choice("frozen_precision", self.frozen_precision, PRECISIONS)
        offline = self.dataset in OFFLINE_DATASETS
        defaults = recipe(self.dataset)
        weights = self.weights
        if weights is None:
            weights = {DEFAULT_DATASET: "source", SOURCE_DATASET: "none"}.get(self.dataset, "imagenet")
        blocks = self.blocks
        if blocks is None and self.method in BLOCK_METHODS:
            blocks = DEFAULT_BLOCKS
        config = dataclasses.replace(
            self, weights=str(weights), blocks=blocks,
            epochs=_default(self.epochs, OFFLINE_EPOCHS if offline else PAPER_EPOCHS),
            lr=_default(self.lr, defaults["lr"]),
            label_smoothing=_default(self.label_smoothing, defaults["label_smoothing"]),
            resolution=_default(self.resolution, OFFLINE_RESOLUTION if offline else PAPER_RESOLUTION),
        )
        check_positive(epochs=config.epochs, batch_size=config.batch_size, resolution=config.resolution)
        if config.limit is not None:
            check_positive(limit=config.limit)
        if config.bottom_chunk is not None:
            check_bottom_chunk(config.bottom_chunk, config.method)
        if config.bn_momentum is not None and not 0 < config.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {config.bn_momentum}")
        if config.workers < 0:
            raise ValueError(f"workers must be 0 or more, got {config.workers}")
        if not (config.lr > 0 and 0 <= config.label_smoothing < 1):
            raise ValueError(f"need lr > 0 and 0 <= label_smoothing < 1, got lr={config.lr}, "
                             f"label_smoothing={config.label_smoothing}")
        return config

    def run_name(self) -> str:
        blocks = f"-{self.blocks}blk" if self.blocks is not None else ""
        return f"{self.model}-{self.method}{blocks}-{self.dataset}-seed{self.seed}"


def _default(value, default):
    return default if value is None else value


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never a pickle
    that could run code; one clear error for a corrupt file or one holding other objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" not in str(error):  # not an object it refused: garbage bytes
            raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or not saved by "
                             f"torch.save)") from error
        # weights_only refused an object: say so in our words, without torch's advice to switch it off
        raise ValueError(f"refused to load {path}: it holds Python objects besides tensors, and unpickling "
                         f"them could run code. mobiletl-edu loads only tensors and plain containers; save "
                         f"weights with torch.save(model.state_dict(), PATH)") from error
    except Exception as error:  # torch raises several types for a truncated or foreign file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or not "
                         f"saved by torch.save): {first_line}") from error


def read_state_dict(path: str | os.PathLike) -> dict:
    """The plain ``state_dict`` in ``path``: a bare one, one under ``"state_dict"``, or the
    fine-tuned model of a run (its folder or ``checkpoint.pt``) turned back into a plain network
    (``mobiletl_edu.export.plain_model``); ``module.`` prefixes (DDP) are removed."""
    path = run_checkpoint_path(path)
    loaded = read_checkpoint(path)
    if isinstance(loaded, dict) and loaded.get("format") == RUN_FORMAT:
        from .export import plain_model
        loaded = plain_model(load_trained(path)[0]).state_dict()
    elif isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, dict) and loaded
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return loaded


def run_checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a run folder."""
    path = Path(path)
    return path / "checkpoint.pt" if path.is_dir() else path


def verify_source_checkpoint(path: str | os.PathLike = SOURCE_CHECKPOINT) -> dict:
    """The provenance record of the shipped source checkpoint, after checking that the file's sha256
    is the recorded one: a modified copy is refused, not silently used."""
    path = Path(path)
    record = json.loads(path.with_suffix(".json").read_text())
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise ValueError(f"the source checkpoint {path} has been modified: its sha256 is {actual}, its "
                         f"provenance ({path.with_suffix('.json').name}) records {record['sha256']}. Restore "
                         f"the file (git checkout, or reinstall mobiletl-edu) or pretrain a new one")
    return record


def imagenet_weights_file(model_name: str) -> tuple[object, Path]:
    """torchvision's default ImageNet weights for ``model_name`` and their torch hub cache path."""
    check_choice("model", model_name, MODEL_NAMES)
    if model_name == "proxyless_mobile":
        raise ValueError("torchvision has no ImageNet weights for proxyless_mobile: download the official "
                         "proxyless_mobile.pth (mit-han-lab/proxylessnas) and pass its path with --weights")
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load_weights(model_name: str, weights: str, num_classes: int, *, new_classifier: bool = True,
                 download: bool = False) -> nn.Module:
    """A plain (un-prepared) model with ``weights`` and a ``num_classes``-way classifier.

    The model is built with the checkpoint's own class count and loaded strictly, so a
    checkpoint of another architecture is an error. For transfer learning (``new_classifier``)
    the classifier is then replaced by a new ``nn.Linear`` (drawn from torch's global RNG: seed
    first), since the target's classes are not the source's; otherwise the checkpoint's
    classifier is kept and must have ``num_classes`` outputs.
    """
    check_choice("model", model_name, MODEL_NAMES)
    if weights == "none":
        return build_model(model_name, num_classes)
    if weights == "imagenet":
        imagenet, path = imagenet_weights_file(model_name)
        if not path.is_file():
            if not download:
                raise FileNotFoundError(
                    f"ImageNet weights for {model_name} are not in the torch hub cache (looked for {path}); "
                    f"pass --download (download=True) to fetch them from {imagenet.url}, or copy the file there")
            _download_weights(imagenet.url, path)
    elif weights == "source":
        if model_name != SOURCE_MODEL:
            raise ValueError(f"the shipped source checkpoint is a {SOURCE_MODEL}, not a {model_name}; "
                             f"pass --weights imagenet, none or a checkpoint path")
        path = SOURCE_CHECKPOINT
        verify_source_checkpoint(path)
    else:
        path = run_checkpoint_path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {weights!r} is neither one of {', '.join(WEIGHT_NAMES)} "
                                    f"nor an existing checkpoint file or run folder")
    state = read_state_dict(path)
    classes = _checkpoint_classes(model_name, state, path)
    if not new_classifier and classes != num_classes:
        raise ValueError(f"{path} has a {classes}-class classifier; the model needs {num_classes} classes")
    model = build_model(model_name, classes)
    if model_name == "proxyless_mobile" and not state.keys() <= model.state_dict().keys():
        from .proxyless import load_proxyless_checkpoint  # the official ProxylessNAS key layout
        load_proxyless_checkpoint(model, path)
    else:  # our own layout, including a run's model (read_state_dict made it a plain network)
        load_matching_state(model, state, f"{path} ({model_name})")
    if new_classifier:
        path = _classifier_path(model)
        set_submodule(model, path, nn.Linear(model.get_submodule(path).in_features, num_classes))
    return model


def _download_weights(url: str, path: Path) -> None:
    """Fetch ``url`` into the hub cache (torch checks the hash in the file name and writes through a
    temporary file); without a network, one error saying where to place the file by hand."""
    from .data import NETWORK_ERRORS, download_failed, remove_new_empty_folders
    existed = next(p for p in path.parents if p.exists())
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = re.search(r"-([a-f0-9]+)\.", path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), digest.group(1) if digest else None, progress=True)
    except NETWORK_ERRORS as error:
        remove_new_empty_folders(path.parent, existed)
        raise download_failed("ImageNet weights", error, f"download {url} elsewhere and copy it to {path}") from error


def _classifier_path(model: nn.Module) -> str:
    return next(u.path for u in find_units(model) if u.role == "classifier")


def _checkpoint_classes(model_name: str, state: dict, path) -> int:
    key = _classifier_path(build_model(model_name, 1)) + ".weight"
    for candidate in (key, "classifier.linear.weight"):  # the second: official ProxylessNAS files
        if candidate in state and state[candidate].dim() == 2:
            return state[candidate].shape[0]
    raise ValueError(f"{path} does not fit {model_name}: it has no classifier weight {key!r} "
                     f"(is it a checkpoint of another model?)")


def load_matching_state(model: nn.Module, state: dict, what: str) -> None:
    """``load_state_dict(strict=True)`` with a short message naming what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        def some(items):
            return ", ".join(items[:3]) + (" ..." if len(items) > 3 else "")
        parts = [f"{len(missing)} missing ({some(missing)})" if missing else "",
                 f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                 f"{len(reshaped)} of another shape (checkpoint vs model: {some(reshaped)})" if reshaped else ""]
        raise ValueError(f"checkpoint does not fit {what}: tensors " + "; ".join(p for p in parts if p))
    model.load_state_dict(state)


def load_trained(run: str | os.PathLike, num_classes: int | None = None) -> tuple[nn.Module, TrainConfig]:
    """The fine-tuned model of a run (its directory or ``checkpoint.pt``), rebuilt by ``prepare``.

    ``num_classes``, when given, must be the run's class count (a clear error otherwise).
    """
    path = Path(run) / "checkpoint.pt" if Path(run).is_dir() else Path(run)
    checkpoint = read_checkpoint(path)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == RUN_FORMAT):
        raise ValueError(f"{path} is not a training-run checkpoint of mobiletl-edu")
    config = TrainConfig(**checkpoint["config"])
    if num_classes is not None and num_classes != checkpoint["num_classes"]:
        raise ValueError(f"{path} was trained for {checkpoint['num_classes']} classes, not {num_classes}")
    model = _prepared_model(config, checkpoint["num_classes"], weights=None)[0]
    load_matching_state(model, checkpoint["model"], f"{path} ({config.model}, {config.method})")
    return model.eval(), config


def _prepared_model(config: TrainConfig, num_classes: int, weights: str | None, download: bool = False):
    """Model (with ``weights``, or random when resuming) and optimizer, as ``prepare`` makes them."""
    torch.manual_seed(config.seed)  # the new classifier and any TinyTL patch start the same every time
    model = load_weights(config.model, weights or "none", num_classes, download=download)
    if config.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = config.bn_momentum
    return prepare(model, config.method, config.blocks, num_classes=num_classes, lr=config.lr,
                   frozen_precision=config.frozen_precision, resolution=config.resolution,
                   bottom_chunk=config.bottom_chunk)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_file(weights: str) -> Path | None:
    """The file that ``weights`` names, if any (for provenance)."""
    if weights == "source":
        return SOURCE_CHECKPOINT
    if weights == "imagenet" or weights == "none":
        return None
    return run_checkpoint_path(weights)


# ---------------------------------------------------------------------------------------------
# Determinism, seeds, several processes
# ---------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, stream: str) -> int:
    """A 63-bit seed for one epoch's ``stream`` ("order", or "rank3" for a process's augmentation)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{stream}".encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """The global RNG states (checkpointed so that a comparison of two runs covers them)."""
    numpy_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"key": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2])}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


@contextmanager
def deterministic_mode(enabled: bool = True):
    """Deterministic kernels (warnings, not errors, where torch has none), restored on exit."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def resolve_device(device: str | None) -> torch.device:
    """``device`` as a torch.device, checked against this machine (None: cuda when available)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device is None:
        return torch.device("cuda" if gpus else "cpu")
    valid = "cpu" + (f", cuda, cuda:0 ... cuda:{gpus - 1}" if gpus else "")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid choices here: {valid}")
    if chosen.type == "cuda" and not gpus:
        raise ValueError(f"device {device!r}: this machine has no CUDA GPU that torch can use; valid choices "
                         f"here: {valid}")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= gpus:
        raise ValueError(f"device {device!r}: this machine has {gpus} GPU(s); valid choices here: {valid}")
    return chosen


@dataclass
class Processes:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    started_group: bool = False  # this object initialised torch.distributed, and closes it

    @classmethod
    def start(cls, device: str | None) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve_device(device)
        if world == 1:
            return cls(0, 1, device)
        import torch.distributed as dist
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device), started)

    def close(self) -> None:
        if self.started_group:
            import torch.distributed as dist
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if self.world == 1:
            return values
        import torch.distributed as dist
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's buffers (BN statistics), as DDP does before each forward."""
        if self.world > 1:
            import torch.distributed as dist
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's counter, or on Linux the process's VmHWM (``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()  # where the system refuses, the peak stays the process's lifetime peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident memory (Python and torch
    included), since the last :func:`reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmHWM") or max_rss_bytes()


# ---------------------------------------------------------------------------------------------
# Files of a run
# ---------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` so that it holds either the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def atomic_save(obj, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_metrics(out: Path, rows: list[dict]) -> None:
    atomic_write_json(out / "metrics.json", rows)
    text = io.StringIO()
    if rows:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_bytes(out / "metrics.csv", text.getvalue().encode())


def holds_run(out: Path) -> bool:
    return (out / "config.json").exists() or (out / "checkpoint.pt").exists()


def default_out(config: TrainConfig, root: str | os.PathLike = "runs") -> Path:
    """``runs/<run name>``, or ``-2``, ``-3`` ... after it when that one is taken."""
    base = Path(root) / config.run_name()
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def train(config: TrainConfig | None = None, out: str | os.PathLike | None = None, *,
          data: tuple[Dataset, Dataset] | None = None, classes: list[str] | None = None,
          data_root: str | os.PathLike = "data", download: bool = False, strict_data: bool = False,
          device: str | None = None, progress: bool = True) -> dict:
    """Run ``config`` from the start into ``out`` (a new or empty directory); return the summary.

    ``data``: your own ``(train, test)`` datasets of ``(image tensor, label)`` pairs, for a config
    with ``dataset="custom"``; ``classes`` names the labels (default: ``train.classes``).
    ``data_root``, ``download``, ``strict_data`` and ``device`` say where data comes from and where
    it runs; they do not change the result and are not part of the config. Everything is checked
    before ``out`` is created, and a run that stops before its first epoch ends leaves nothing.
    """
    config = (config or TrainConfig()).resolved()
    check_out(default_out(config) if out is None else Path(out), create_parents=out is None)
    out = Path(out) if out is not None else default_out(config)
    return _fit(config, out, None, Where(data, classes, data_root, download, strict_data, device, progress))


@dataclass
class Where:
    """Where a run's data comes from and how it reports: never part of its result."""

    data: tuple | None = None
    classes: list | None = None
    data_root: str | os.PathLike = "data"
    download: bool = False
    strict_data: bool = False
    device: str | None = None
    progress: bool = True


def check_out(out: Path, *, create_parents: bool = False) -> None:
    """Refuse, before anything is written, an output path that cannot be created: its parent is
    missing (only defaults such as ``runs/`` are created with their parents) or not writable."""
    out = Path(out)
    if not create_parents and not out.exists() and not out.parent.is_dir():
        raise FileNotFoundError(f"cannot create {out}: its parent folder {out.parent} does not exist; "
                                f"create it first or choose another --out")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create {out}: {existing} is a file, not a folder")
    try:  # os.access says yes to root on a read-only file system: try it
        os.rmdir(tempfile.mkdtemp(prefix=".mobiletl-write-check-", dir=existing))
    except OSError as error:
        raise PermissionError(f"cannot create {out}: the folder {existing} is not writable "
                              f"({error.strerror}); choose another --out") from error


def _refuse_occupied(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "holds another run" if holds_run(out) else "is not an empty directory"
        raise FileExistsError(f"output directory {out} {what}; choose a new --out"
                              + (f" or continue it with: {resume_command(out)}" if holds_run(out) else ""))


def resume_command(out: Path, data_root: str | os.PathLike = "data") -> str:
    """The command line that continues the run in ``out``."""
    command = ["mobiletl-edu", "train", "--resume", "--out", str(out)]
    command += ["--data-root", str(data_root)] if str(data_root) != "data" else []
    return shlex.join(command)


def resume(out: str | os.PathLike, expected: dict | None = None, *, data: tuple[Dataset, Dataset] | None = None,
           classes: list[str] | None = None, data_root: str | os.PathLike = "data", download: bool = False,
           strict_data: bool = False, device: str | None = None, progress: bool = True) -> dict:
    """Continue the run in ``out`` from its last checkpoint (or from the start if it has none).

    ``expected`` holds config values the caller asked for (the CLI's explicit flags); any that
    differ from the run's own config are an error, so a resume never silently changes the run,
    with one exception: a larger ``epochs`` continues the run (finished or not) for more epochs,
    its cosine schedule stretched to the new length from the step it has reached.
    """
    out = Path(out)
    if not (out / "config.json").is_file():
        raise FileNotFoundError(f"{out} holds no run to resume (no config.json); start one without --resume")
    checkpoint = None
    if (out / "checkpoint.pt").exists():
        checkpoint = read_checkpoint(out / "checkpoint.pt")
        if not (isinstance(checkpoint, dict) and checkpoint.get("format") == RUN_FORMAT):
            raise ValueError(f"{out / 'checkpoint.pt'} is not a training-run checkpoint of mobiletl-edu")
        saved = checkpoint["config"]
    else:
        saved = json.loads((out / "config.json").read_text())["config"]
    asked = {k: v for k, v in (expected or {}).items() if v is not None}
    unknown = sorted(set(asked) - set(saved))
    if unknown:
        raise ValueError(f"unknown config fields {unknown}")
    differ = {k: (v, saved[k]) for k, v in asked.items() if v != saved[k] and k != "epochs"}
    if differ:
        listing = ", ".join(f"{k}={wanted!r} (the run has {had!r})" for k, (wanted, had) in differ.items())
        raise ValueError(f"cannot resume {out} with different settings: {listing}")
    epochs = asked.get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise ValueError(f"cannot resume {out} with epochs={epochs}: the run has {saved['epochs']}; --epochs can "
                         f"only grow (a larger number continues the run for more epochs)")
    config = dataclasses.replace(TrainConfig(**saved), epochs=epochs)
    return _fit(config, out, checkpoint, Where(data, classes, data_root, download, strict_data, device, progress),
                resuming=True)


def train_or_resume(config: TrainConfig, out: str | os.PathLike, **options) -> dict:
    """Start ``config`` in ``out``, continue it there, or (finished) just return its summary."""
    config, out = config.resolved(), Path(out)
    if holds_run(out):
        return resume(out, dataclasses.asdict(config), **options)
    return train(config, out, **options)


def _fixed_subset(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` images of a fixed shuffle (seed 0, whatever the run's seed)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit].tolist())


def _fit(config: TrainConfig, out: Path, checkpoint: dict | None, where: Where, resuming: bool = False) -> dict:
    procs = Processes.start(where.device)
    try:
        if not resuming:
            _refuse_occupied(out)
        procs.barrier()  # every process has looked before any writes
        return _fit_here(config, out, checkpoint, procs, where)
    finally:
        procs.close()


def _datasets(config: TrainConfig, where: Where, procs: Processes):
    """(train, test, class names) of the run: the config's dataset, or the caller's own data."""
    if (config.dataset == CUSTOM_DATASET) != (where.data is not None):
        raise ValueError(f"pass your own datasets with data=(train, test) together with dataset="
                         f"{CUSTOM_DATASET!r}, and only then (this config has dataset={config.dataset!r})")
    if where.data is not None:
        train_ds, test_ds = where.data
        names = where.classes or getattr(train_ds, "classes", None)
        if not names:
            raise ValueError("name the classes of your data: classes=[...], or a .classes attribute on it")
        return train_ds, test_ds, [str(c) for c in names]
    if where.download and procs.rank != 0:
        procs.barrier()  # rank 0 downloads first
    train_ds, test_ds, num_classes = build_datasets(config.dataset, where.data_root, config.resolution,
                                                    where.download, strict_data=where.strict_data)
    if where.download and procs.rank == 0:
        procs.barrier()
    return train_ds, test_ds, class_names(train_ds, num_classes)


def class_names(dataset: Dataset, num_classes: int) -> list[str]:
    """The dataset's ``classes`` (also through ``Subset`` and ``ConcatDataset``), else "class 0" ..."""
    while not hasattr(dataset, "classes") and isinstance(dataset, (Subset, ConcatDataset)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.datasets[0]
    names = getattr(dataset, "classes", None)
    return [str(c) for c in names] if names is not None and len(names) == num_classes else \
        [f"class {i}" for i in range(num_classes)]


def _fit_here(config: TrainConfig, out: Path, checkpoint, procs, where: Where) -> dict:
    if config.batch_size % procs.world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {procs.world} processes")
    with deterministic_mode(config.deterministic):
        train_ds, test_ds, classes = _datasets(config, where, procs)
        num_classes = len(classes)
        train_ds, test_ds = _fixed_subset(train_ds, config.limit), _fixed_subset(test_ds, config.limit)
        if checkpoint is not None and checkpoint["num_classes"] != num_classes:
            raise ValueError(f"{out / 'checkpoint.pt'} was trained for {checkpoint['num_classes']} classes; "
                             f"dataset {config.dataset!r} has {num_classes}")
        model, optimizer = _prepared_model(config, num_classes, None if checkpoint else config.weights,
                                           where.download)
        steps = len(train_ds) // config.batch_size if procs.world > 1 else -(-len(train_ds) // config.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
        rows, orders, start, created = [], [], 0, None
        if checkpoint is not None:
            load_matching_state(model, checkpoint["model"], f"{out / 'checkpoint.pt'}")
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            rows, orders, start = checkpoint["metrics"], checkpoint["data_order"], checkpoint["epoch"]
            if checkpoint["config"]["epochs"] != config.epochs:
                _stretch_schedule(scheduler, config.epochs * steps)
                if procs.rank == 0:
                    _record_extension(out, checkpoint["config"]["epochs"], config.epochs)
        elif procs.rank == 0:
            created = next(p for p in (out, *out.parents) if p.exists())
            out.mkdir(parents=True, exist_ok=True)
            source = weights_file(config.weights)
            atomic_write_json(out / "config.json", {
                "config": dataclasses.asdict(config), "num_classes": num_classes, "classes": classes,
                "weights_sha256": file_sha256(source) if source else None,
                "skipped_images": getattr(train_ds, "skipped", []),
                "torch": torch.__version__, "torchvision": torchvision.__version__,
                "processes": procs.world, "threads": torch.get_num_threads()})
        try:
            return _epochs(config, out, model, optimizer, scheduler, train_ds, test_ds, classes, procs, where,
                           rows, orders, start)
        except BaseException:
            if created is not None and not (out / "checkpoint.pt").exists():  # nothing worth resuming
                for name in ("config.json", "metrics.json", "metrics.csv"):
                    (out / name).unlink(missing_ok=True)
                from .data import remove_new_empty_folders
                remove_new_empty_folders(out, created)
            raise


def _epochs(config, out, model, optimizer, scheduler, train_ds, test_ds, classes, procs, where, rows, orders,
            start) -> dict:
    model.to(procs.device)
    _move_optimizer_state(optimizer, procs.device)
    stored = _stored_activation_bytes(model, train_ds, config.batch_size // procs.world, procs.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    network = model
    if procs.world > 1:
        network = nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(start, config.epochs):
        row, digest = _train_epoch(network, model, optimizer, scheduler, criterion, train_ds, test_ds,
                                   config, epoch, procs, where.progress, out, rows)
        row.update(stored_activation_bytes=stored, peak_memory_bytes=peak_memory_bytes(procs.device))
        rows, orders = rows + [row], orders + [digest]
        if procs.rank == 0:
            atomic_save({"format": RUN_FORMAT, "version": 1, "config": dataclasses.asdict(config),
                         "num_classes": len(classes), "classes": classes, "epoch": epoch + 1,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "rng": rng_states(), "data_order": orders,
                         "metrics": rows}, out / "checkpoint.pt")
            write_metrics(out, rows)
            if where.progress:
                tqdm.write(_epoch_line(row, config.epochs), file=sys.stderr)
        procs.barrier()
    summary = {"config": dataclasses.asdict(config), "num_classes": len(classes), "classes": classes,
               "epochs_done": len(rows), "trainable_parameters": trainable, "stored_activation_bytes": stored,
               "final": rows[-1] if rows else None, "out": str(out)}
    if procs.rank == 0:
        write_metrics(out, rows)
        atomic_write_json(out / "summary.json", summary)
    return summary


def _stretch_schedule(scheduler, total_steps: int) -> None:
    """Continue the cosine schedule as if it had been ``total_steps`` long from the start: torch's
    recursive update only scales the current rate, so the rate is set to the closed form first."""
    scheduler.T_max, step = total_steps, scheduler.last_epoch
    rates = [scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / total_steps)) / 2
             for base in scheduler.base_lrs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def _record_extension(out: Path, before: int, after: int) -> None:
    """config.json says the run was continued from ``before`` to ``after`` epochs."""
    record = json.loads((out / "config.json").read_text())
    record["config"]["epochs"] = after
    record.setdefault("continued", []).append({"from_epochs": before, "to_epochs": after})
    atomic_write_json(out / "config.json", record)


def _move_optimizer_state(optimizer, device) -> None:
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                state[key] = value.to(device)


def _stored_activation_bytes(model: nn.Module, dataset: Dataset, batch_size: int, device) -> int:
    """``measure.saved_activations`` of one training step on the first images, on a copy of the
    model and with the RNG state put back, so that measuring changes nothing in the run."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        items = [dataset[i] for i in range(min(batch_size, len(dataset)))]
        inputs = torch.stack([x for x, _ in items]).to(device)
        targets = torch.tensor([y for _, y in items], device=device)
        return saved_activations(copy.deepcopy(model), inputs, targets).total_bytes


def _train_epoch(network, model, optimizer, scheduler, criterion, train_ds, test_ds, config, epoch, procs,
                 progress, out, rows):
    """One epoch of training and one evaluation; returns its metrics row and data-order digest."""
    shuffle = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, "order"))
    order = torch.randperm(len(train_ds), generator=shuffle)
    if procs.world > 1:  # every process takes every world-th image of the same order
        order = order[: len(order) // config.batch_size * config.batch_size][procs.rank::procs.world]
    seed_everything(epoch_seed(config.seed, epoch, f"rank{procs.rank}"))  # augmentation, dropout, workers
    loader = DataLoader(train_ds, batch_size=config.batch_size // procs.world, sampler=order.tolist(),
                        num_workers=config.workers)
    reset_peak_memory(procs.device)
    network.train()
    started = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,  # bars on a terminal only
               disable=not progress or procs.rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    for step, (inputs, targets) in enumerate(bar):
        inputs, targets = inputs.to(procs.device), targets.to(procs.device)
        logits = network(inputs)
        loss = criterion(logits, targets)
        value = procs.sum([loss.item()])[0] / procs.world
        if not np.isfinite(value):
            _diverged(out, rows, f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} "
                      f"(learning rate {scheduler.get_last_lr()[0]:.3g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += value * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%")
    bar.close()
    loss_sum, correct, seen = procs.sum([loss_sum, correct, seen])
    procs.share_buffers(model)
    test = evaluate(model, test_ds, procs=procs, workers=config.workers)
    elapsed = time.perf_counter() - started
    if not (np.isfinite(test["loss"]) and all(torch.isfinite(p).all() for p in model.parameters())):
        _diverged(out, rows, f"the weights became NaN or infinite at epoch {epoch + 1} "
                  f"(test loss {test['loss']})")
    row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / seen,
           "train_top1": 100 * correct / seen, "test_loss": test["loss"], "test_top1": test["top1"],
           "epoch_time_s": elapsed}
    return row, hashlib.sha256(order.numpy().tobytes()).hexdigest()


def _diverged(out: Path, rows: list, what: str):
    kept = (f"the last good checkpoint (epoch {rows[-1]['epoch']}) is kept in {out / 'checkpoint.pt'}"
            if rows else "no checkpoint was written")
    raise TrainingDiverged(f"training stopped: {what}; {kept}. Try a lower learning rate (--lr).")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = EVAL_BATCH_SIZE,
             procs: Processes | None = None, workers: int = 0) -> dict:
    """Mean cross-entropy (no smoothing) and top-1 accuracy (%) of ``model`` on ``dataset``."""
    procs = procs or Processes(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    shard = list(range(procs.rank, len(dataset), procs.world))
    loss_sum, correct = 0.0, 0
    for inputs, targets in DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=workers):
        inputs, targets = inputs.to(procs.device), targets.to(procs.device)
        logits = model(inputs)
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(1) == targets).sum().item()
    model.train(was_training)
    loss_sum, correct, seen = procs.sum([loss_sum, correct, len(shard)])
    return {"loss": loss_sum / max(seen, 1), "top1": 100 * correct / max(seen, 1)}


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, train top-1 "
            f"{row['train_top1']:.2f}%, test top-1 {row['test_top1']:.2f}%, {row['epoch_time_s']:.1f} s, "
            f"stored activations {row['stored_activation_bytes'] / 1e6:.2f} MB, "
            f"peak memory {row['peak_memory_bytes'] / 1e6:.0f} MB")
