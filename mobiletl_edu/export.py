"""Use a fine-tuned run: evaluate it, predict with it, export it as a plain network.

A prepared model trains with operators that only training needs: sign-approximated activations
(their forward is the exact one), shift-only BatchNorms (an eval-mode BN with frozen scale),
frozen layers stored in int8, BNs folded into the frozen bottom's convs. For inference each of
them is an ordinary torchvision layer, and :func:`plain_model` puts those back: the result is a
standard torchvision-shaped network (TinyTL's patches stay, as plain ``LiteResidual`` modules)
that computes the prepared model's eval-mode logits, and that TorchScript and ONNX can export.

    model, config = load_trained("runs/my-run")      # the prepared model, in eval mode
    plain = plain_model(model)                        # nn.Conv2d / nn.BatchNorm2d / nn.Hardswish ...
    export_run("runs/my-run", "onnx")                 # runs/my-run/model.onnx
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .choices import CUSTOM_DATASET, DATASET_NAMES, EXPORT_FORMATS, check_choice
from .data import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, build_datasets, readable_image, test_transform
from .methods import FoldedBatchNorm
from .ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from .quant import FrozenLayer
from .train import EVAL_BATCH_SIZE, _fixed_subset, load_trained, read_checkpoint, resolve_device, run_checkpoint_path

EXACT_ACTIVATION = {SignHardswish: nn.Hardswish, SignReLU6: nn.ReLU6, SignReLU: nn.ReLU}
DEFAULT_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "state-dict": "model_state_dict.pt"}
ONNX_OPSET = 18


# ---------------------------------------------------------------------------------------------
# The plain network
# ---------------------------------------------------------------------------------------------
def plain_model(model: nn.Module) -> nn.Module:
    """An inference-only copy of a prepared ``model`` made of ordinary layers, in eval mode.

    Sign-approximated activations become the exact ones, a ``ShiftOnlyBatchNorm2d`` an
    ``nn.BatchNorm2d``, a ``FrozenLayer`` an ``nn.Conv2d`` / ``nn.Linear`` with its dequantized
    weight, and a BN folded into a frozen conv comes back as a BN after it (unit scale, the
    folded shift), so the parameter names are the torchvision model's. Hooks are dropped.
    """
    plain = copy.deepcopy(model).eval()
    _replace_children(plain)
    for m in plain.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


def _replace_children(module: nn.Module) -> None:
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        if type(child) in EXACT_ACTIVATION:
            setattr(module, name, EXACT_ACTIVATION[type(child)]())
        elif isinstance(child, ShiftOnlyBatchNorm2d):
            setattr(module, name, _batch_norm(child.num_features, child.eps, child.weight, child.bias,
                                              child.running_mean, child.running_var, child.num_batches_tracked))
        elif isinstance(child, FrozenLayer):
            folded_into = children[i + 1][1] if i + 1 < len(children) else None
            restore_bn = child.folded_batchnorm and isinstance(folded_into, FoldedBatchNorm)
            setattr(module, name, _plain_layer(child, keep_bias=not restore_bn))
            if restore_bn:
                n, eps = folded_into.num_features, folded_into.eps
                setattr(module, children[i + 1][0], _batch_norm(
                    n, eps, torch.ones(n), child.bias, torch.zeros(n), torch.full((n,), 1 - eps)))
        else:
            _replace_children(child)


def _batch_norm(n, eps, weight, bias, mean, var, tracked=None) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(n, eps=eps)
    with torch.no_grad():
        for target, value in ((bn.weight, weight), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
            target.copy_(value.detach())
        if tracked is not None:
            bn.num_batches_tracked.copy_(tracked)
    return bn.eval()


def _plain_layer(frozen: FrozenLayer, keep_bias: bool) -> nn.Module:
    weight = frozen.dequantized_weight(torch.float32)
    bias = frozen.bias is not None and keep_bias
    if frozen.conv_args is None:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    else:
        layer = nn.Conv2d(frozen.in_features, frozen.out_features, tuple(weight.shape[2:]), bias=bias,
                          **frozen.conv_args)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.copy_(frozen.bias.detach())
    return layer


# ---------------------------------------------------------------------------------------------
# A run: its model, its classes
# ---------------------------------------------------------------------------------------------
def run_classes(run: str | os.PathLike) -> list[str]:
    """The class names a run was trained on (older runs: ``class 0``, ``class 1`` ...)."""
    checkpoint = read_checkpoint(run_checkpoint_path(run))
    return list(checkpoint.get("classes") or [f"class {i}" for i in range(checkpoint["num_classes"])])


# ---------------------------------------------------------------------------------------------
# Evaluate and predict
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_run(run: str | os.PathLike, dataset: str | None = None, *, data_root: str | os.PathLike = "data",
                 download: bool = False, strict_data: bool = False, device: str | None = None) -> dict:
    """Top-1, mean cross-entropy, per-class top-1 and the confusion matrix (rows: true class,
    columns: predicted) of a run's model on the test split of ``dataset`` (default: its own)."""
    model, config = load_trained(run)
    classes = run_classes(run)
    name = dataset or config.dataset
    if name == CUSTOM_DATASET:
        raise ValueError(f"{run} was trained on data passed in Python; evaluate it on a named dataset "
                         f"(--dataset {' | '.join(DATASET_NAMES)})")
    _, test_ds, num_classes = build_datasets(name, data_root, config.resolution, download, strict_data)
    if num_classes != len(classes):
        raise ValueError(f"{run} predicts {len(classes)} classes; dataset {name!r} has {num_classes}")
    if name == config.dataset:
        test_ds = _fixed_subset(test_ds, config.limit)  # the images the run was evaluated on
    model.to(resolve_device(device))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    for images, labels in DataLoader(test_ds, batch_size=EVAL_BATCH_SIZE):
        logits = model(images.to(next(model.parameters()).device)).cpu()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1),
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
    seen = confusion.sum(1)
    return {"run": str(run), "dataset": name, "images": int(seen.sum()), "loss": loss_sum / max(int(seen.sum()), 1),
            "top1": 100 * confusion.diag().sum().item() / max(int(seen.sum()), 1), "classes": classes,
            "per_class_top1": {c: (100 * confusion[i, i].item() / seen[i].item() if seen[i] else None)
                               for i, c in enumerate(classes)},
            "confusion": confusion.tolist()}


def plot_confusion(result: dict):
    """The confusion matrix of :func:`evaluate_run` as a matplotlib Figure: counts, rows normalized
    to the share of each true class that went to each predicted class."""
    from matplotlib.figure import Figure

    counts = torch.tensor(result["confusion"], dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp_min(1)
    n = len(result["classes"])
    fig = Figure(figsize=(2.2 + 0.55 * n, 1.6 + 0.5 * n))
    ax = fig.subplots()
    image = ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.6 else "black")
        ax.set_xticks(range(n), result["classes"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), result["classes"], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{result['dataset']}: top-1 {result['top1']:.2f}% on {result['images']} images", fontsize=9)
    fig.colorbar(image, ax=ax, label="share of the true class")
    fig.tight_layout()
    return fig


def image_files(paths) -> list[Path]:
    """The image files among ``paths``; a folder stands for the images inside it (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


@torch.no_grad()
def predict(run: str | os.PathLike, paths, top: int = 5, device: str | None = None) -> list[dict]:
    """The ``top`` most likely classes (names and softmax probabilities) for each image in ``paths``
    (files or folders), preprocessed as the run's test images. An unreadable image is an error."""
    model, config = load_trained(run)
    classes = run_classes(run)
    top = min(top, len(classes))
    model.to(resolve_device(device))
    transform = test_transform(config.resolution)
    results = []
    for path in image_files(paths):
        problem = readable_image(path)
        if problem is not None:
            raise ValueError(f"cannot read image {path} ({problem})")
        with Image.open(path) as image:
            x = transform(image.convert("RGB")).unsqueeze(0)
        probabilities = model(x.to(next(model.parameters()).device)).softmax(1)[0].cpu()
        values, indices = probabilities.topk(top)
        results.append({"file": str(path), "top": [{"class": classes[i], "probability": v}
                                                    for v, i in zip(values.tolist(), indices.tolist())]})
    return results


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None) -> Path:
    """Write the run's plain model as ``fmt`` (torchscript, onnx, state-dict) to ``out`` (default:
    a file in the run folder) and return its path. ``out`` must not exist; the file appears
    whole or not at all. TorchScript and ONNX files carry the class names and input size."""
    check_choice("format", fmt, EXPORT_FORMATS)
    checkpoint_path = run_checkpoint_path(run)
    out = Path(out) if out is not None else checkpoint_path.parent / DEFAULT_FILES[fmt]
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another --out (nothing was overwritten)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: the folder {out.parent} does not exist")
    model, config = load_trained(run)
    plain = plain_model(model)
    meta = {"model": config.model, "method": config.method, "classes": run_classes(run),
            "input_shape": [1, 3, config.resolution, config.resolution], "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD)}
    example = torch.zeros(meta["input_shape"])
    fd, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript as deprecated
            if fmt == "state-dict":
                torch.save(plain.state_dict(), temporary)
            elif fmt == "torchscript":
                torch.jit.save(torch.jit.script(plain), temporary, _extra_files={"mobiletl.json": json.dumps(meta)})
            else:
                _export_onnx(plain, example, temporary, meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(temporary, out)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return out


def _export_onnx(plain: nn.Module, example: torch.Tensor, path: str, meta: dict) -> None:
    """ONNX with a free batch axis and the class names in the metadata. torch 2.14 has two
    exporters; on MobileNetV3-Small, V2, ResNet18 and ProxylessNAS-Mobile both gave the logits
    of PyTorch under onnxruntime, and the TorchScript-based one (``dynamo=False``) took 7 to 8 s
    a model on a 2-core CPU where the dynamo exporter took 20 to 50 s: we use the first."""
    try:
        import onnx
    except ImportError as error:
        raise ValueError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript "
                         "(the project's test extra has them)") from error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(plain, (example,), path, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mobiletl", json.dumps(meta)
    onnx.save(proto, path)
