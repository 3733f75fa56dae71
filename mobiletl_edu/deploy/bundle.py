"""Training bundles: a prepared model written out for a device, and brought back.

``write_bundle`` prepares a model with a method (``methods.prepare``), checks the analytic
training peak against the device's memory budget, and writes a folder::

    manifest.json          model, method, blocks, classes, input, recipe, network description,
                           torch versions, the peak estimate, and the sha256 of every file
    frozen.safetensors     what never trains: int8 weights with per-channel scales, frozen BNs
    trainable.safetensors  what trains, in float32
    run.py                 the device runner (Python 3.6 + torch 1.10 and later; torch only)
    README.md              the device's set-up steps and the runner's commands

The network description is a tree of small records, one per module, in the package's module
names, so ``run.py`` rebuilds the same modules and the same state-dict keys without the
package. ``import_bundle`` goes the other way: it reads a bundle (and the checkpoint the runner
wrote while training on the device) and writes a run folder that ``train.load_trained`` reads.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torchvision.models import mobilenetv2, mobilenetv3, resnet
from torchvision.ops.misc import SqueezeExcitation

from .. import __version__
from ..choices import FOLDER_DATASET, WEIGHT_NAMES
from ..data import IMAGENET_MEAN, IMAGENET_STD
from ..methods import LiteResidual, _contiguous_output, prepare
from ..models import check_positive, find_units
from ..ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from ..quant import FrozenLayer
from . import run as runner
from .devices import get_device, training_peak_bytes

RUNNER_SOURCE = Path(runner.__file__)
# torch releases the runner is tested on (make device-test): the Nano's API and today's
TESTED_TORCH = ("1.10.1", "1.10.2", "2.14.1")

_ACTIVATIONS = {nn.Hardswish: "hardswish", nn.ReLU6: "relu6", nn.ReLU: "relu", nn.Hardsigmoid: "hardsigmoid"}
_SIGN = {SignHardswish: "hardswish", SignReLU6: "relu6", SignReLU: "relu"}


def describe_module(m: nn.Module) -> dict:
    """One module as a record ``run.build_module`` rebuilds; ValueError for a module it cannot."""
    if isinstance(m, FrozenLayer):
        weight = m.weight_int8 if m.precision == "int8" else m.weight_float
        spec = {"type": "frozen", "kind": "linear" if m.conv_args is None else "conv2d", "precision": m.precision,
                "weight_shape": list(weight.shape), "bias": m.bias is not None, "channels_last": m.channels_last}
        if m.conv_args is not None:
            spec.update({k: list(v) if isinstance(v, tuple) else v for k, v in m.conv_args.items()})
        return spec
    if isinstance(m, ShiftOnlyBatchNorm2d):
        return {"type": "shift_only_bn", "features": m.num_features, "eps": m.eps,
                "train_shift": m.bias.requires_grad}
    if isinstance(m, nn.BatchNorm2d):
        if not (m.affine and m.track_running_stats):
            raise ValueError(f"cannot bundle {m}: only affine BatchNorms with running statistics")
        return {"type": "batchnorm", "features": m.num_features, "eps": m.eps, "momentum": m.momentum}
    if isinstance(m, nn.GroupNorm):  # TinyTL's lite residual patches
        return {"type": "groupnorm", "groups": m.num_groups, "channels": m.num_channels, "eps": m.eps,
                "affine": m.affine}
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"cannot bundle {m}: only zero padding given as numbers")
        return {"type": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": list(m.kernel_size),
                "stride": list(m.stride), "padding": list(m.padding), "dilation": list(m.dilation),
                "groups": m.groups, "bias": m.bias is not None}
    if isinstance(m, nn.Linear):
        return {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if type(m) in _SIGN:
        return {"type": "activation", "kind": _SIGN[type(m)], "sign": True}
    if type(m) in _ACTIVATIONS:
        return {"type": "activation", "kind": _ACTIVATIONS[type(m)], "inplace": getattr(m, "inplace", False)}
    if isinstance(m, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)):
        body = "conv" if isinstance(m, mobilenetv2.InvertedResidual) else "block"
        return {"type": "inverted_residual", "body": body, "residual": m.use_res_connect,
                "inplace_add": body == "block", "children": _children(getattr(m, body))}
    if isinstance(m, SqueezeExcitation):
        return {"type": "squeeze_excitation", "children": _children(m)}
    if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck)):
        return {"type": "residual_block", "stages": 2 if isinstance(m, resnet.BasicBlock) else 3,
                "children": _children(m)}
    if isinstance(m, LiteResidual):
        return {"type": "lite_residual", "children": _children(m)}
    if isinstance(m, nn.Sequential):
        return {"type": "sequential", "children": _children(m)}
    if isinstance(m, nn.Dropout):
        return {"type": "dropout", "p": m.p, "inplace": m.inplace}
    if isinstance(m, nn.Identity):
        return {"type": "identity"}
    if isinstance(m, nn.Flatten):
        if (m.start_dim, m.end_dim) != (1, -1):
            raise ValueError(f"cannot bundle {m}: only flatten from dimension 1")
        return {"type": "flatten"}
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return {"type": "adaptive_avgpool", "output": m.output_size}
    if isinstance(m, nn.AvgPool2d):
        return {"type": "avgpool", "kernel": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad}
    if isinstance(m, nn.MaxPool2d):
        return {"type": "maxpool", "kernel": m.kernel_size, "stride": m.stride, "padding": m.padding,
                "dilation": m.dilation, "ceil_mode": m.ceil_mode}
    raise ValueError(f"cannot bundle a {type(m).__name__}: the device runner has no such layer")


def _children(m: nn.Module) -> list:
    return [[name, describe_module(child)] for name, child in m.named_children()]


def describe_network(model: nn.Module) -> dict:
    """The whole network: its layout (how the top level runs), its children and where the frozen
    bottom ends (its output is made contiguous again, as ``prepare`` does with a hook)."""
    if isinstance(model, resnet.ResNet):
        layout = "resnet"
    elif isinstance(model, mobilenetv2.MobileNetV2):
        layout = "mobilenet_v2"
    elif hasattr(model, "features") and hasattr(model, "avgpool") and hasattr(model, "classifier"):
        layout = "features"  # MobileNetV3, ProxylessNAS-Mobile: features, avgpool, flatten, classifier
    else:
        raise ValueError(f"cannot bundle a {type(model).__name__}: the device runner knows MobileNetV2/V3, "
                         f"ProxylessNAS-Mobile and ResNet layouts")
    hooked = [name for name, m in model.named_modules()
              if any(h is _contiguous_output for h in m._forward_hooks.values())]
    return {"type": "network", "layout": layout, "bottom_output": hooked[-1] if hooked else None,
            "children": _children(model)}


_OUTLINE_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def outline(spec: dict, name: str = "", depth: int = 0) -> str:
    """A network description (or part of one) as an indented list, one module a line,
    leaving out settings at their defaults."""
    details = {}
    for key, value in spec.items():
        if isinstance(value, list) and value and not isinstance(value[0], list) and len(set(value)) == 1:
            value = value[0]  # [3, 3] -> 3
        if key not in ("type", "children") and value not in (None, False, _OUTLINE_DEFAULTS.get(key, ())):
            details[key] = value
    text = ", ".join(f"{k}={v}" for k, v in details.items())
    lines = [f"{'  ' * depth}{name or '(root)'}: {spec['type']}" + (f" ({text})" if text else "")]
    for child, child_spec in spec.get("children", []):
        lines.append(outline(child_spec, child, depth + 1))
    return "\n".join(lines)


def split_state(model: nn.Module) -> tuple[dict, dict]:
    """(frozen, trainable): the model's state dict split by whether a tensor trains."""
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    return ({k: v for k, v in state.items() if k not in trainable_names},
            {k: v for k, v in state.items() if k in trainable_names})


def write_bundle(out, *, model: str = "mobilenet_v3_small", method: str = "mobiletl", blocks: int | None = 3,
                 device: str = "pi4", classes: int = 10, weights: str = "imagenet", class_names=None,
                 batch: int = 8, resolution: int = 224, lr: float = 3e-4, label_smoothing: float = 0.1,
                 epochs: int = 10, memory_gb: int | None = None, budget_mb: int | None = None,
                 force: bool = False, download: bool = False, seed: int = 0) -> dict:
    """Write a training bundle for ``device`` into the new folder ``out``; return its manifest.

    Refuses (ValueError) when the analytic training peak exceeds the device's budget, unless
    ``force``; refuses (FileExistsError) an ``out`` that exists and is not empty. Nothing is
    left behind on failure: the bundle is written beside ``out`` and renamed into place.
    """
    from ..train import file_sha256, load_weights, weights_file

    profile = get_device(device)
    check_positive(classes=classes, batch=batch, resolution=resolution, epochs=epochs)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != classes:
            raise ValueError(f"{len(class_names)} class names given for {classes} classes")
    if not (lr > 0 and 0 <= label_smoothing < 1):
        raise ValueError(f"need lr > 0 and 0 <= label_smoothing < 1, got lr={lr}, label_smoothing={label_smoothing}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty; choose a new --out")
    budget = budget_mb * 2**20 if budget_mb is not None else profile.budget_bytes(memory_gb)
    peak = training_peak_bytes(model, method, blocks, batch=batch, resolution=resolution, classes=classes)
    if peak > budget and not force:
        raise ValueError(f"{model} {method} at batch {batch}, {resolution}x{resolution} needs about "
                         f"{peak / 2**20:.0f} MiB to train (analytic peak with gradients and Adam state); "
                         f"the {profile.title}'s budget is {budget / 2**20:.0f} MiB. Use a smaller --batch, "
                         f"--resolution or a method that trains less, or pass --force")

    torch.manual_seed(seed)  # the new classifier
    network = prepare(load_weights(model, weights, classes, download=download), method, blocks,
                      num_classes=classes, lr=lr, resolution=resolution).model
    frozen, trainable = split_state(network)
    source = weights_file(weights)
    manifest = {
        "format": runner.BUNDLE_FORMAT, "version": 1, "created_by": f"mobiletl-edu {__version__}",
        "model": model, "method": method, "blocks": blocks, "classes": classes, "class_names": class_names,
        "device": profile.name,
        "weights": {"name": weights if weights in WEIGHT_NAMES else Path(weights).name,
                    "sha256": file_sha256(source) if source else None},
        "input": {"size": resolution, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "train": {"epochs": epochs, "batch": batch, "lr": lr, "label_smoothing": label_smoothing},
        "torch": {"minimum": "1.10", "tested": list(TESTED_TORCH), "written_with": torch.__version__},
        "estimate": {"training_peak_bytes": peak, "budget_bytes": budget, "forced": peak > budget,
                     "how": "profiler.training_peak: every tensor alive at once in one step (parameters, buffers, "
                            "Adam state, batch, gradients, stored activations, kernel temporaries)"},
        "units": [[u.path, u.role] for u in find_units(network)],
        "network": describe_network(network),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files = {runner.FROZEN_FILE: runner.tensors_bytes(frozen), runner.TRAINABLE_FILE: runner.tensors_bytes(trainable),
                 "run.py": RUNNER_SOURCE.read_bytes(), "README.md": bundle_readme(manifest, profile).encode()}
        for name, data in files.items():
            (staging / name).write_bytes(data)
        manifest["files"] = {name: runner.sha256_file(staging / name) for name in sorted(files)}
        (staging / runner.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        staging.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            out.rmdir()  # empty, checked above
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def bundle_readme(manifest: dict, profile) -> str:
    """The bundle's README: what it holds, the device's set-up steps, the runner's commands."""
    blocks = f", {manifest['blocks']} blocks" if manifest["blocks"] else ""
    steps = "\n".join(f"    {step}" for step in profile.install)
    pitfalls = "\n".join(f"- {p}" for p in profile.pitfalls)
    return f"""# Training bundle: {manifest['model']}, {manifest['method']}{blocks}, {manifest['classes']} classes

Made by {manifest['created_by']} for the {profile.title} ({profile.software}).
Everything here is checked against the sha256 in `manifest.json` before use.

## Set up the device

{steps}

## Run

    python3 run.py --check                       # verify the files, one training step
    python3 run.py --bench --steps 20            # step latency, batch 8, random data
    python3 run.py --data IMAGES --epochs 5      # fine-tune: IMAGES/<class>/<image files>
    python3 run.py --data IMAGES --resume        # continue after an interruption
    python3 run.py --predict IMAGE               # classify with the fine-tuned network
    python3 run.py --calibrate --json > constants.json   # the latency model's constants here

Checkpoints go to `training/` (or `--out DIR`). Back on a machine with mobiletl-edu:
`mobiletl-edu import-bundle THIS_FOLDER` makes a run folder that `evaluate` and `export` read.

## Known pitfalls on this device

{pitfalls}
"""


def read_device_checkpoint(folder: Path, checkpoint: Path | None = None):
    """The runner's checkpoint for a bundle: ``(tensors, state)``, or ``({}, None)`` if it has none."""
    path = Path(checkpoint) if checkpoint is not None else Path(folder) / "training" / runner.CHECKPOINT_FILE
    if checkpoint is not None and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        return {}, None
    return runner.load_checkpoint(str(path))


def bundle_model(folder, checkpoint=None) -> tuple[nn.Module, dict, dict | None]:
    """The package's prepared model with a bundle's weights (and the device's training, if any)."""
    folder = Path(folder)
    try:
        manifest, state, _ = runner.read_bundle(str(folder))
        tensors, trained = read_device_checkpoint(folder, checkpoint)
    except runner.BundleError as error:
        raise ValueError(str(error)) from None
    if trained is not None and trained.get("bundle_files") != manifest["files"]:
        raise ValueError(f"the checkpoint in {folder} was trained from another bundle")
    state.update({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    network = prepare(manifest["model"], manifest["method"], manifest["blocks"], num_classes=manifest["classes"],
                      lr=manifest["train"]["lr"], resolution=manifest["input"]["size"]).model
    from ..train import load_matching_state
    load_matching_state(network, state, f"bundle {folder}")
    return network.eval(), manifest, trained


def import_bundle(folder, out=None, checkpoint=None) -> Path:
    """Write the run folder of a bundle trained on the device; ``train.load_trained`` reads it."""
    from ..train import RUN_FORMAT, TrainConfig, atomic_save, atomic_write_json

    folder = Path(folder)
    out = Path(out) if out is not None else Path("runs") / f"{folder.resolve().name}-imported"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output folder {out} exists and is not empty; choose a new --out")
    network, manifest, trained = bundle_model(folder, checkpoint)
    recipe = (trained or {}).get("recipe") or dict(manifest["train"], seed=0)
    config = TrainConfig(model=manifest["model"], method=manifest["method"], blocks=manifest["blocks"],
                         dataset=FOLDER_DATASET, weights="none", epochs=recipe["epochs"],
                         seed=recipe.get("seed", 0), batch_size=recipe["batch"], lr=recipe["lr"],
                         label_smoothing=recipe["label_smoothing"], resolution=manifest["input"]["size"])
    progress = (trained or {}).get("progress") or {}
    class_names = (trained or {}).get("class_names") or manifest.get("class_names")
    from dataclasses import asdict
    record = {"config": asdict(config), "num_classes": manifest["classes"], "class_names": class_names,
              "imported_from": {"bundle": str(folder.resolve()), "files": manifest["files"],
                                "device": manifest["device"], "trained_on_device": trained is not None,
                                "epochs_done": progress.get("epoch", 0), "history": progress.get("history", []),
                                "torch": (trained or {}).get("torch")}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", record)
    atomic_save({"format": RUN_FORMAT, "version": 1, "config": asdict(config), "num_classes": manifest["classes"],
                 "epoch": progress.get("epoch", 0), "model": network.state_dict(), "classes": class_names,
                 "metrics": progress.get("history", []), "imported_from": record["imported_from"]},
                out / "checkpoint.pt")
    return out


