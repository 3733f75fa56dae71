"""The offline source checkpoint: a MobileNetV3-Small pretrained by this package on a source task.

Transfer learning needs a network trained on something else first. The paper starts from
ImageNet weights; with no network access we stand in for them with the package's own
pretraining: MobileNetV3-Small trained from scratch (``ft-all``, random initialisation) on
``offline-source`` (five Fashion-MNIST classes), then fine-tuned on ``offline-target`` (the five
other classes). The result ships as ``assets/offline_source_mobilenet_v3_small.pt`` (a plain
``state_dict``) with ``.json`` provenance beside it: the command, seed, data, sha256 and versions.
Running that command again with the same torch build, CPU and thread count gives the same bytes.
"""
from __future__ import annotations

import io
import json
import os
import platform
from pathlib import Path

import torch
import torchvision

from .choices import PRETRAIN_OUT, SOURCE_DATASET
from .data import remove_new_empty_folders
from .train import (SOURCE_MODEL, TrainConfig, atomic_write_bytes, atomic_write_json, check_out,  # noqa: F401
                    file_sha256, read_state_dict, train_or_resume, verify_source_checkpoint)

# The recipe of the shipped checkpoint (its provenance JSON records the exact command).
PRETRAIN_EPOCHS, PRETRAIN_BATCH_SIZE, PRETRAIN_LR, PRETRAIN_RESOLUTION = 30, 32, 2e-3, 64
# torchvision's MobileNetV3 BN momentum (0.01) suits ImageNet's 40k steps an epoch; from scratch on
# 2,000 images its running statistics lag far behind the weights, and eval-mode accuracy collapses.
PRETRAIN_BN_MOMENTUM = 0.1


def provenance_path(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".json")


def pretrain_config(*, epochs: int = PRETRAIN_EPOCHS, seed: int = 0, batch_size: int = PRETRAIN_BATCH_SIZE,
                    lr: float = PRETRAIN_LR, resolution: int = PRETRAIN_RESOLUTION,
                    bn_momentum: float = PRETRAIN_BN_MOMENTUM, limit: int | None = None) -> TrainConfig:
    """Every parameter of MobileNetV3-Small trains from random weights on the source task."""
    return TrainConfig(model=SOURCE_MODEL, method="ft-all", dataset=SOURCE_DATASET, weights="none",
                       epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, resolution=resolution,
                       bn_momentum=bn_momentum, limit=limit).resolved()


def command_line(config: TrainConfig, out: str | os.PathLike) -> str:
    """The ``mobiletl-edu pretrain`` command that makes ``config`` (for the provenance record)."""
    line = (f"mobiletl-edu pretrain --out {out} --epochs {config.epochs} --seed {config.seed} "
            f"--batch-size {config.batch_size} --lr {config.lr:g} --resolution {config.resolution} "
            f"--bn-momentum {config.bn_momentum:g} --threads {torch.get_num_threads()}")
    return line + (f" --limit {config.limit}" if config.limit is not None else "")


def pretrain(out: str | os.PathLike = PRETRAIN_OUT,
             config: TrainConfig | None = None, *, work_dir: str | os.PathLike | None = None,
             progress: bool = True) -> dict:
    """Train ``config`` (default :func:`pretrain_config`) and write its weights to ``out``.

    The run itself goes to ``work_dir`` (default: ``<out without suffix>-run``), which makes an
    interrupted pretraining resumable; ``out`` must not exist yet. Returns the provenance record.
    """
    config = config or pretrain_config()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing was overwritten)")
    check_out(out, create_parents=out == Path(PRETRAIN_OUT))
    work_dir = Path(work_dir) if work_dir is not None else out.with_name(out.stem + "-run")
    existed = next(p for p in (out.parent, *out.parents) if p.exists())
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        summary = train_or_resume(config, work_dir, progress=progress)
    except BaseException:
        remove_new_empty_folders(out.parent, existed)  # a run that kept nothing leaves no folder
        raise
    state = read_state_dict(work_dir / "checkpoint.pt")  # an ft-all model is a plain state_dict
    buffer = io.BytesIO()
    torch.save({k: v.clone().contiguous() for k, v in state.items()}, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    record = {
        "command": command_line(config, out),
        "seed": config.seed,
        "data": {"dataset": SOURCE_DATASET, "images": "Fashion-MNIST subset shipped in "
                 "mobiletl_edu/assets/fashion_mnist_subset.npz (see mobiletl_edu.data)",
                 "classes": "T-shirt/top, Trouser, Pullover, Sandal, Bag (disjoint from offline-target)"},
        "config": summary["config"],
        "source_test_top1": summary["final"]["test_top1"],
        "sha256": file_sha256(out),
        "bytes": out.stat().st_size,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "note": "stands in for ImageNet pretraining in the offline experiments; the same bytes come "
                "back from the command with the same torch build, CPU and thread count",
    }
    atomic_write_json(provenance_path(out), record)
    return record
