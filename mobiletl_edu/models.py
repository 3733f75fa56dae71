"""Model registry and block discovery: which modules are the blocks, the fusion layers, the classifier.

A network is read as an ordered list of *units* that partitions its forward pass:

    stem -> block 1 ... block N -> fusion layer(s) -> head (pool, activation, dropout) -> classifier

MobileNetV2/V3 and ProxylessNAS-Mobile keep these in ``features`` + ``classifier``; a ResNet keeps
them as its own children. "Fine-tuning K blocks" (the paper's FT-K-BLKs) trains the last K units
whose role is ``block``, plus the fusion layers and the classifier (Figure 4's caption).
"""
from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn
from torchvision.models import mobilenetv2, mobilenetv3, resnet
from torchvision.ops.misc import SqueezeExcitation

from .choices import MODEL_NAMES, check_choice
from .proxyless import proxyless_mobile
from .quant import FrozenLayer

INVERTED_RESIDUALS = (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual)
RESNET_BLOCKS = (resnet.BasicBlock, resnet.Bottleneck)

# torchvision's builder of each name; ours for ProxylessNAS-Mobile
MODEL_BUILDERS = {name: proxyless_mobile if name == "proxyless_mobile" else getattr(torchvision.models, name)
                  for name in MODEL_NAMES}


def build_model(name: str, num_classes: int = 1000) -> nn.Module:
    """A randomly initialised model from the registry (weights are loaded separately)."""
    check_choice("model", name, MODEL_NAMES)
    check_positive(num_classes=num_classes)
    if name == "proxyless_mobile":
        return proxyless_mobile(num_classes=num_classes)
    return MODEL_BUILDERS[name](weights=None, num_classes=num_classes)


def check_positive(**values) -> None:
    """ValueError naming the first argument that is not a positive integer (bools are refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Unit:
    path: str  # dotted name inside the model, for get_submodule
    role: str  # stem | block | fusion | head | classifier


def find_units(model: nn.Module) -> list[Unit]:
    """The model's units in forward order; ValueError if its blocks cannot be recognised."""
    features, classifier = getattr(model, "features", None), getattr(model, "classifier", None)
    if isinstance(features, nn.Sequential) and isinstance(classifier, (nn.Sequential, nn.Linear)):
        units = _sequential_units(features, type(model).__name__, INVERTED_RESIDUALS)
        if hasattr(model, "avgpool"):
            units.append(Unit("avgpool", "head"))
        units += _classifier_units(classifier)
    elif all(hasattr(model, n) for n in ("conv1", "bn1", "layer1", "layer4", "fc")):
        units = [Unit(n, "stem") for n in ("conv1", "bn1", "relu", "maxpool")]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            units += [Unit(f"{stage}.{i}", "block") for i in range(len(getattr(model, stage)))]
        units += [Unit("avgpool", "head"), Unit("fc", "classifier")]
        if not all(_is_block(model.get_submodule(u.path), RESNET_BLOCKS) for u in units if u.role == "block"):
            raise ValueError(f"{type(model).__name__}: ResNet stages hold blocks that are not BasicBlock/Bottleneck")
    else:
        raise ValueError(
            f"cannot recognise the blocks of {type(model).__name__}: expected a MobileNetV2/V3 or "
            f"ProxylessNAS layout (features + classifier) or a torchvision ResNet; "
            f"supported models: {', '.join(MODEL_NAMES)}"
        )
    return units


def _is_block(module: nn.Module, block_types) -> bool:
    """A block, or a block wrapped by TinyTL's lite residual patch (``methods.LiteResidual.main``)."""
    return isinstance(module, block_types) or isinstance(getattr(module, "main", None), block_types)


def _sequential_units(features: nn.Sequential, model_name: str, block_types) -> list[Unit]:
    is_block = [_is_block(m, block_types) for m in features]
    if not any(is_block):
        raise ValueError(f"cannot recognise the blocks of {model_name}: its features hold no inverted "
                         f"residual block; supported models: {', '.join(MODEL_NAMES)}")
    first, last = is_block.index(True), len(is_block) - 1 - is_block[::-1].index(True)
    if not all(is_block[first : last + 1]):
        raise ValueError(f"cannot recognise the blocks of {model_name}: its inverted residual blocks are "
                         f"not contiguous in features")
    roles = ["stem"] * first + ["block"] * (last + 1 - first) + ["fusion"] * (len(features) - last - 1)
    return [Unit(f"features.{i}", role) for i, role in enumerate(roles)]


def _classifier_units(classifier: nn.Module) -> list[Unit]:
    """The last Linear is the classifier; Linears before it are fusion layers (MobileNetV3's 576->1024),
    also once ``prepare`` has frozen them."""
    if isinstance(classifier, nn.Linear):
        return [Unit("classifier", "classifier")]
    linears = [i for i, m in enumerate(classifier)
               if isinstance(m, nn.Linear) or (isinstance(m, FrozenLayer) and m.kind == "Linear")]
    if not linears:
        raise ValueError("the model's classifier has no nn.Linear layer")
    roles = {i: "fusion" for i in linears[:-1]} | {linears[-1]: "classifier"}
    return [Unit(f"classifier.{i}", roles.get(i, "head")) for i in range(len(classifier))]


def block_units(model: nn.Module) -> list[Unit]:
    return [u for u in find_units(model) if u.role == "block"]


def norm_roles(block: nn.Module) -> dict[str, str]:
    """Name each BatchNorm of a block by what it normalises (Figure 6's exp/dw/proj-bn).

    Inverted residual: ``expand``, ``depthwise``, ``project`` (the block's last BN).
    ResNet block: ``intermediate``, ``last``, ``shortcut`` (the downsample branch's BN).
    """
    roles, previous_conv, found = {}, None, []
    for name, m in block.named_modules():
        if isinstance(m, nn.Conv2d):
            previous_conv = m
        elif isinstance(m, nn.BatchNorm2d):
            found.append((name, previous_conv))
    if isinstance(block, RESNET_BLOCKS):
        main = [n for n, _ in found if not n.startswith("downsample")]
        for n, _ in found:
            roles[n] = "shortcut" if n.startswith("downsample") else ("last" if n == main[-1] else "intermediate")
        return roles
    for i, (name, conv) in enumerate(found):
        if i == len(found) - 1:
            roles[name] = "project"
        elif conv is not None and conv.groups > 1 and conv.groups == conv.in_channels:
            roles[name] = "depthwise"
        else:
            roles[name] = "expand"
    return roles


def has_squeeze_excitation(block: nn.Module) -> bool:
    return any(isinstance(m, SqueezeExcitation) for m in block.modules())


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
