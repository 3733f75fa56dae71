"""ProxylessNAS-Mobile built from torchvision parts, plus a loader for official weights.

Architecture source: Cai, Zhu and Han, "ProxylessNAS: Direct Neural Architecture
Search on Target Task and Hardware", ICLR 2019. The network searched for mobile
latency ("proxyless_mobile") is published as a JSON net config next to its
weights (``proxyless_mobile.config`` / ``proxyless_mobile.pth``) and is built by
``ProxylessNASNets.build_from_config`` in ``mit-han-lab/proxylessnas``
(``proxyless_nas/nas_modules.py``, ``proxyless_nas/layers.py``) and in
``mit-han-lab/once-for-all`` (``ofa/imagenet_classification/networks/proxyless_nets.py``).
TinyTL and MobileTL both use this network as a backbone.

The block table below restates that config; it was cross-checked against the
per-stage transcription in ``osmr/imgclsmob``
(``pytorch/pytorchcv/models/proxylessnas.py``), whose 4,080,512 ImageNet
parameters this module reproduces. With 100 classes the count is 2,927,612, the
FT-All figure of MobileTL's Table 3 for Proxyless-Mobile on CIFAR-100.

Facts taken from the original implementation:

* stem: 3x3 conv, stride 2, 32 channels, BN, ReLU6;
* 22 searched positions; two of them chose the "zero" operation, which makes the
  whole block an identity (no weights), so 20 inverted residual blocks remain;
* every block is expand 1x1 -> depthwise kxk -> project 1x1 with BN after each
  conv and ReLU6 after the first two; the expand conv is absent when the
  expansion ratio is 1 (the fixed first block, 32 -> 16); no squeeze-excitation;
* the identity shortcut exists exactly when stride is 1 and the block keeps its
  channel count (the same rule as torchvision's ``InvertedResidual``);
* "feature mix" 1x1 conv 320 -> 1280 with BN and ReLU6, global average pooling,
  then a linear classifier;
* BatchNorm uses ``eps=1e-3`` and ``momentum=0.1`` (the config's "bn" entry).

The module layout (``features`` / ``avgpool`` / ``classifier``, torchvision
``InvertedResidual`` blocks) matches torchvision's MobileNets so that the rest
of the package can find blocks the same way in every backbone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from os import PathLike
from typing import NamedTuple

import torch
from torch import nn
from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig
from torchvision.ops.misc import Conv2dNormActivation

__all__ = [
    "PROXYLESS_MOBILE_BLOCKS",
    "ProxylessBlock",
    "ProxylessNASMobile",
    "load_proxyless_checkpoint",
    "official_key_map",
    "proxyless_mobile",
]

STEM_CHANNELS = 32
FEATURE_MIX_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.1


class ProxylessBlock(NamedTuple):
    """One searched position of ProxylessNAS-Mobile.

    ``is_zero`` marks a position where the search picked the zero operation: the
    block only passes its input through, has no weights, and is left out of the
    built network (its index still counts in the official checkpoint keys).
    """

    kernel: int
    expand_ratio: int
    out_channels: int
    stride: int
    is_zero: bool = False


def _zero_block(channels: int) -> ProxylessBlock:
    return ProxylessBlock(kernel=0, expand_ratio=0, out_channels=channels, stride=1, is_zero=True)


# Indexed like ``blocks.N`` in the official checkpoint. Input channels are the
# previous row's output (the stem's 32 for row 0).
PROXYLESS_MOBILE_BLOCKS: tuple[ProxylessBlock, ...] = (
    #              kernel, expand, out, stride
    ProxylessBlock(3, 1, 16, 1),    # 0   fixed first block, 112x112
    ProxylessBlock(5, 3, 32, 2),    # 1   -> 56x56
    ProxylessBlock(3, 3, 32, 1),    # 2
    _zero_block(32),                # 3   searched away
    _zero_block(32),                # 4   searched away
    ProxylessBlock(7, 3, 40, 2),    # 5   -> 28x28
    ProxylessBlock(3, 3, 40, 1),    # 6
    ProxylessBlock(5, 3, 40, 1),    # 7
    ProxylessBlock(5, 3, 40, 1),    # 8
    ProxylessBlock(7, 6, 80, 2),    # 9   -> 14x14
    ProxylessBlock(5, 3, 80, 1),    # 10
    ProxylessBlock(5, 3, 80, 1),    # 11
    ProxylessBlock(5, 3, 80, 1),    # 12
    ProxylessBlock(5, 6, 96, 1),    # 13
    ProxylessBlock(5, 3, 96, 1),    # 14
    ProxylessBlock(5, 3, 96, 1),    # 15
    ProxylessBlock(5, 3, 96, 1),    # 16
    ProxylessBlock(7, 6, 192, 2),   # 17  -> 7x7
    ProxylessBlock(7, 6, 192, 1),   # 18
    ProxylessBlock(7, 3, 192, 1),   # 19
    ProxylessBlock(7, 3, 192, 1),   # 20
    ProxylessBlock(7, 6, 320, 1),   # 21
)


def _batch_norm(num_features: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


def _use_relu6(module: nn.Module) -> None:
    """Swap every nn.ReLU inside ``module`` for nn.ReLU6 (ProxylessNAS uses ReLU6 only)."""
    for parent in module.modules():
        for name, child in parent.named_children():
            if type(child) is nn.ReLU:
                setattr(parent, name, nn.ReLU6(inplace=True))


def _inverted_residual(in_channels: int, spec: ProxylessBlock) -> InvertedResidual:
    config = InvertedResidualConfig(
        input_channels=in_channels,
        kernel=spec.kernel,
        expanded_channels=in_channels * spec.expand_ratio,
        out_channels=spec.out_channels,
        use_se=False,
        activation="RE",
        stride=spec.stride,
        dilation=1,
        width_mult=1.0,
    )
    block = InvertedResidual(config, norm_layer=_batch_norm)
    _use_relu6(block)
    return block


class ProxylessNASMobile(nn.Module):
    """ProxylessNAS-Mobile with torchvision's MobileNet module layout."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            Conv2dNormActivation(
                3, STEM_CHANNELS, kernel_size=3, stride=2,
                norm_layer=_batch_norm, activation_layer=nn.ReLU6,
            )
        ]
        channels = STEM_CHANNELS
        for spec in PROXYLESS_MOBILE_BLOCKS:
            if spec.is_zero:
                continue
            layers.append(_inverted_residual(channels, spec))
            channels = spec.out_channels
        layers.append(
            Conv2dNormActivation(
                channels, FEATURE_MIX_CHANNELS, kernel_size=1,
                norm_layer=_batch_norm, activation_layer=nn.ReLU6,
            )
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(FEATURE_MIX_CHANNELS, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def proxyless_mobile(num_classes: int = 1000, dropout: float = 0.1) -> ProxylessNASMobile:
    """Build ProxylessNAS-Mobile (randomly initialised) with ``num_classes`` outputs."""
    return ProxylessNASMobile(num_classes=num_classes, dropout=dropout)


# ---------------------------------------------------------------------------
# Official checkpoint layout
# ---------------------------------------------------------------------------

# Inside one official conv unit: sub-module name -> index in Conv2dNormActivation.
_CONV_UNIT_PARTS = {"conv": "0", "bn": "1"}
_CONV_LEAVES = ("weight",)
_BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Official MBInvertedConvLayer parts, in the order they appear in a block.
_BLOCK_PARTS_WITH_EXPANSION = ("inverted_bottleneck", "depth_conv", "point_linear")
_BLOCK_PARTS_WITHOUT_EXPANSION = ("depth_conv", "point_linear")
# Official classifier (LinearLayer.linear) -> nn.Linear at classifier[1].
_CLASSIFIER_PAIR = ("classifier.linear", "classifier.1")
# Newer once-for-all code names the block's conv ``conv`` instead of
# ``mobile_inverted_conv``; both spellings refer to the same weights.
_OFA_BLOCK_ALIAS = re.compile(r"^blocks\.(\d+)\.conv\.")


def _conv_unit_pairs() -> list[tuple[str, str]]:
    """(official prefix, our prefix) for every conv+BN unit, in network order."""
    pairs = [("first_conv", "features.0")]
    feature_index = 1
    for official_index, spec in enumerate(PROXYLESS_MOBILE_BLOCKS):
        if spec.is_zero:
            continue
        parts = _BLOCK_PARTS_WITH_EXPANSION if spec.expand_ratio > 1 else _BLOCK_PARTS_WITHOUT_EXPANSION
        for position, part in enumerate(parts):
            pairs.append((
                f"blocks.{official_index}.mobile_inverted_conv.{part}",
                f"features.{feature_index}.block.{position}",
            ))
        feature_index += 1
    pairs.append(("feature_mix_layer", f"features.{feature_index}"))
    return pairs


def official_key_map() -> dict[str, str]:
    """Every official ProxylessNAS state-dict key mapped to this module's key."""
    key_map: dict[str, str] = {}
    for official_prefix, our_prefix in _conv_unit_pairs():
        for part, index in _CONV_UNIT_PARTS.items():
            leaves = _CONV_LEAVES if part == "conv" else _BN_LEAVES
            for leaf in leaves:
                key_map[f"{official_prefix}.{part}.{leaf}"] = f"{our_prefix}.{index}.{leaf}"
    official_prefix, our_prefix = _CLASSIFIER_PAIR
    for leaf in ("weight", "bias"):
        key_map[f"{official_prefix}.{leaf}"] = f"{our_prefix}.{leaf}"
    return key_map


def _read_state_dict(path: str | PathLike) -> dict[str, torch.Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for a corrupt file
        raise ValueError(f"{path!s} is not a readable PyTorch checkpoint: {error}") from error
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()
    ):
        raise ValueError(f"{path!s} does not hold a state_dict (a mapping of names to tensors)")
    state = dict(checkpoint)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _is_official_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(("first_conv.", "blocks.", "feature_mix_layer.")) for key in state)


def _translate_official(
    state: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename official keys to ours; return (state, our key -> source key, unknown keys).

    Checkpoints written before PyTorch 0.4.1 carry no ``num_batches_tracked``;
    those counters are taken from the model so that a strict load still works.
    """
    key_map = official_key_map()
    translated: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unknown: list[str] = []
    for key, value in state.items():
        canonical = _OFA_BLOCK_ALIAS.sub(r"blocks.\1.mobile_inverted_conv.", key)
        if canonical not in key_map:
            unknown.append(key)
            continue
        translated[key_map[canonical]] = value
        source_of[key_map[canonical]] = key
    for our_key in key_map.values():
        if our_key.endswith(".num_batches_tracked") and our_key not in translated and our_key in current:
            translated[our_key] = current[our_key].clone()
            source_of[our_key] = our_key
    return translated, source_of, unknown


def _shape_mismatch_message(path: str, source_key: str, expected: torch.Size, found: torch.Size) -> str:
    message = (
        f"{path}: checkpoint tensor '{source_key}' has shape {tuple(found)}, "
        f"the model expects {tuple(expected)}"
    )
    if source_key in ("classifier.linear.weight", "classifier.linear.bias", "classifier.1.weight", "classifier.1.bias"):
        message += (
            f" (the checkpoint has {found[0]} classes, the model {expected[0]}; build the model with "
            f"num_classes={found[0]}, load, then replace model.classifier[1])"
        )
    return message


def load_proxyless_checkpoint(
    model: nn.Module,
    path: str | PathLike,
    strict: bool = True,
):
    """Load weights into a :func:`proxyless_mobile` model.

    Accepts this module's own ``state_dict`` or the official ProxylessNAS /
    once-for-all layout (``first_conv.*``, ``blocks.N.mobile_inverted_conv.*``,
    ``feature_mix_layer.*``, ``classifier.linear.*``), optionally wrapped under a
    ``"state_dict"`` key. The file is read with ``weights_only=True``, so no
    arbitrary objects are unpickled.

    Shapes must always match (a different class count is an error); ``strict``
    only decides whether missing or unexpected keys are errors. Returns the
    ``(missing_keys, unexpected_keys)`` result of ``load_state_dict``.

    Raises:
        ValueError: the file is not a PyTorch checkpoint, does not hold a
            state_dict, or holds tensors whose names or shapes do not fit.
    """
    path_text = str(path)
    state = _read_state_dict(path)
    current = model.state_dict()

    if _is_official_layout(state):
        state, source_of, unknown = _translate_official(state, current)
    else:
        source_of = {key: key for key in state}
        unknown = []
    unknown += [source_of[key] for key in state if key not in current]
    state = {key: value for key, value in state.items() if key in current}

    for our_key, value in state.items():
        expected = current[our_key].shape
        if value.shape != expected:
            raise ValueError(_shape_mismatch_message(path_text, source_of[our_key], expected, value.shape))

    if strict:
        missing = [key for key in current if key not in state]
        if unknown or missing:
            raise ValueError(
                f"{path_text}: checkpoint does not match ProxylessNAS-Mobile; "
                f"unexpected keys: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}, "
                f"missing keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
    result = model.load_state_dict(state, strict=strict)
    if not strict:
        result.unexpected_keys.extend(unknown)
    return result
