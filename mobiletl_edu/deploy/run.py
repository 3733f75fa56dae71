#!/usr/bin/env python3
"""The device runner of a MobileTL training bundle: fine-tune the bundled network here.

Needs Python >= 3.6 and torch >= 1.10, and Pillow for image folders; nothing else, not even
the mobiletl-edu package (a Jetson Nano's last JetPack has Python 3.6 and torch 1.10). In the
bundle folder:

    python3 run.py --check                   verify every file, build the network, one step
    python3 run.py --bench --steps 20        step latency on random data (the paper's Table 6)
    python3 run.py --data DIR --epochs 5     fine-tune on an image folder, one sub-folder a class
    python3 run.py --predict IMAGE           classify one image with the fine-tuned network
    python3 run.py --calibrate               measure the latency model's constants here

The network is rebuilt from ``manifest.json``: the frozen bottom's convolutions as int8 weights
with one float scale per output channel (``frozen.safetensors``), the trained top as float
tensors (``trainable.safetensors``). Every file's sha256 is checked against the manifest
before anything is loaded. The operators are MobileTL's (Chiang et al., AAAI 2023): activations
whose backward keeps a 1-bit packed sign mask, BatchNorms whose statistics and scale are frozen
so that backward keeps one number per channel, and frozen layers that keep no input.

Written for Python 3.6 and torch 1.10 as well as today's releases: no dataclasses, no new
syntax, no torch API newer than 1.10 (``make test`` checks both). Tensors are read and written
in the safetensors layout (a JSON header and raw little-endian bytes), never unpickled.
"""
import argparse
import ctypes
import hashlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

BUNDLE_FORMAT = "mobiletl-edu-bundle"
CHECKPOINT_FORMAT = "mobiletl-edu-device-checkpoint"
FROZEN_FILE, TRAINABLE_FILE, MANIFEST = "frozen.safetensors", "trainable.safetensors", "manifest.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
TRAIN_CROP_SCALE = (0.22, 1.0)  # TinyTL's RandomResizedCrop scale, which MobileTL follows


class BundleError(Exception):
    """A problem with the bundle or the user's input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Files: sha256 and the safetensors layout, with ctypes copies (no numpy, no pickle)

DTYPES = {"F32": torch.float32, "F16": torch.float16, "F64": torch.float64, "I8": torch.int8,
          "U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}
DTYPE_NAMES = dict((dtype, name) for name, dtype in DTYPES.items())


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_bytes(tensors, metadata=None):
    """``{name: tensor}`` (and ``{str: str}`` metadata) as the bytes of a safetensors file."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise BundleError("tensor {} has dtype {}, which the bundle format does not store".format(name, t.dtype))
        n = t.numel() * t.element_size()
        chunks.append(ctypes.string_at(t.data_ptr(), n) if n else b"")
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict((str(k), str(v)) for k, v in metadata.items())
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    if sys.byteorder != "little":
        raise BundleError("this runner writes little-endian tensors and needs a little-endian machine")
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def parse_tensors(data, what):
    """``({name: tensor}, metadata)`` from the bytes of a safetensors file; BundleError if malformed."""
    data = bytearray(data)
    if len(data) < 8:
        raise BundleError("{} is not a tensor file (too short)".format(what))
    size = int.from_bytes(bytes(data[:8]), "little")
    if size > len(data) - 8:
        raise BundleError("{} is not a tensor file (its header runs past the end)".format(what))
    try:
        header = json.loads(bytes(data[8:8 + size]).decode("utf-8"))
    except ValueError:
        raise BundleError("{} is not a tensor file (unreadable header)".format(what))
    if sys.byteorder != "little":
        raise BundleError("this runner reads little-endian tensors and needs a little-endian machine")
    start, tensors = 8 + size, {}
    metadata = header.pop("__metadata__", None) or {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], [int(s) for s in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise BundleError("{}: tensor {} has a malformed entry".format(what, name))
        t = torch.empty(shape, dtype=dtype)
        n = t.numel() * t.element_size()
        if min(shape + [0]) < 0 or end - begin != n or begin < 0 or start + end > len(data):
            raise BundleError("{}: tensor {} does not fit its bytes".format(what, name))
        if n:
            ctypes.memmove(t.data_ptr(), (ctypes.c_char * n).from_buffer(data, start + begin), n)
        tensors[name] = t
    return tensors, metadata


def atomic_write(path, data):
    """Write ``path`` so that it holds the old or the new content, never a mix."""
    temporary = "{}.tmp{}".format(path, os.getpid())
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def save_checkpoint(path, tensors, state):
    """A self-checking file: the sha256 of the tensor bytes travels in the header's metadata."""
    body = tensors_bytes(tensors)
    digest = hashlib.sha256(body).hexdigest()
    atomic_write(path, tensors_bytes(tensors, {"format": CHECKPOINT_FORMAT, "state": json.dumps(state),
                                               "tensors_sha256": digest}))


def load_checkpoint(path):
    with open(path, "rb") as f:
        tensors, metadata = parse_tensors(f.read(), path)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise BundleError("{} is not a checkpoint of this runner".format(path))
    if hashlib.sha256(tensors_bytes(tensors)).hexdigest() != metadata.get("tensors_sha256"):
        raise BundleError("{} is corrupt: its tensors do not match the sha256 it recorded".format(path))
    return tensors, json.loads(metadata["state"])


def read_bundle(folder):
    """The manifest and ``{name: tensor}`` of a bundle, after checking every file's sha256."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise BundleError("{} holds no {}: is it a training bundle?".format(folder, MANIFEST))
    with open(path) as f:
        try:
            manifest = json.load(f)
        except ValueError as error:
            raise BundleError("{} is not valid JSON: {}".format(path, error))
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError("{} is not a mobiletl-edu training bundle manifest".format(path))
    files = manifest.get("files") or {}
    for name in (FROZEN_FILE, TRAINABLE_FILE):
        if name not in files:
            raise BundleError("{} lists no sha256 for {}".format(path, name))
    for name in sorted(files):
        file_path = os.path.join(folder, name)
        if os.path.basename(name) != name:
            raise BundleError("{} names a file outside the bundle: {!r}".format(path, name))
        if not os.path.isfile(file_path):
            raise BundleError("bundle file {} is missing; copy the whole bundle folder again".format(file_path))
        if sha256_file(file_path) != files[name]:
            raise BundleError("bundle file {} does not match its sha256 in {} (changed or corrupt); "
                              "refusing to load it".format(file_path, MANIFEST))
    state = {}
    for name in (FROZEN_FILE, TRAINABLE_FILE):
        with open(os.path.join(folder, name), "rb") as f:
            state.update(parse_tensors(f.read(), name)[0])
    with open(os.path.join(folder, TRAINABLE_FILE), "rb") as f:
        trainable = sorted(parse_tensors(f.read(), TRAINABLE_FILE)[0])
    return manifest, state, trainable


# ---------------------------------------------------------------------------------------------
# MobileTL's operators

BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # bit 7 first: the package's pack_bits order


def pack_bits(mask):
    """A boolean tensor as ``ceil(n / 8)`` bytes, first element in the top bit (weighted sum)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed, n):
    """The first ``n`` bits of ``packed`` as 0/1 bytes."""
    shifts = torch.tensor((7, 6, 5, 4, 3, 2, 1, 0), dtype=torch.uint8, device=packed.device)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)[:n]


ACTIVATIONS = {"hardswish": F.hardswish, "relu6": F.relu6, "relu": F.relu, "hardsigmoid": F.hardsigmoid}


class SignApproximated(torch.autograd.Function):
    """Exact forward; backward ``grad * 1[x >= 0]`` from a 1-bit mask."""

    @staticmethod
    def forward(ctx, x, kind):
        ctx.shape = x.shape
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(pack_bits(x >= 0))
        return ACTIVATIONS[kind](x)

    @staticmethod
    def backward(ctx, grad_out):
        packed, = ctx.saved_tensors
        # 0/1 bytes: the product promotes them to the gradient's dtype
        mask = unpack_bits(packed, grad_out.numel()).view(ctx.shape)
        return grad_out * mask, None


class Activation(nn.Module):
    def __init__(self, kind, sign=False, inplace=False):
        super(Activation, self).__init__()
        self.kind, self.sign, self.inplace = kind, sign, inplace

    def forward(self, x):
        if self.sign:
            return SignApproximated.apply(x, self.kind)
        if self.inplace and self.kind != "hardsigmoid":
            return ACTIVATIONS[self.kind](x, inplace=True)
        return ACTIVATIONS[self.kind](x)


class ShiftOnlyBatchNorm2d(nn.Module):
    """Frozen statistics and scale, trainable shift: backward keeps one scale per channel."""

    def __init__(self, features, eps, train_shift):
        super(ShiftOnlyBatchNorm2d, self).__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(features), requires_grad=train_shift)
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if not (torch.is_grad_enabled() and (x.requires_grad or self.bias.requires_grad)):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        with torch.no_grad():
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            offset = -self.running_mean * scale
            scale, offset = [t.to(x.dtype).view(1, -1, 1, 1) for t in (scale, offset)]
        return x * scale + (offset + self.bias.to(x.dtype).view(1, -1, 1, 1))


class FrozenWeightOp(torch.autograd.Function):
    """conv2d / linear with a constant weight: backward needs the weight, never the input."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer, ctx.input_shape, ctx.dtype = layer, x.shape, x.dtype
        return layer.plain_forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        layer, grad_x, grad_b = ctx.layer, None, None
        if ctx.needs_input_grad[0]:
            weight = layer.dequantized_weight(ctx.dtype)
            if layer.conv is None:
                grad_x = grad_out.matmul(weight)
            else:
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_out, **layer.conv)
        if ctx.needs_input_grad[1]:
            channel = 1 if layer.conv is not None else grad_out.dim() - 1
            grad_b = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != channel])
        return grad_x, grad_b, None


class FrozenLayer(nn.Module):
    """A frozen conv or linear layer: int8 weight times a float scale per output channel."""

    def __init__(self, spec):
        super(FrozenLayer, self).__init__()
        shape = spec["weight_shape"]
        self.conv = None if spec["kind"] == "linear" else dict(
            stride=tuple(spec["stride"]), padding=tuple(spec["padding"]), dilation=tuple(spec["dilation"]),
            groups=spec["groups"])
        self.precision, self.channels_last = spec["precision"], spec.get("channels_last", False)
        if self.precision == "int8":
            self.register_buffer("weight_int8", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(shape[0]))
        else:
            self.register_buffer("weight_float", torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape[0]), requires_grad=False) if spec["bias"] else None

    def dequantized_weight(self, dtype=torch.float32):
        if self.precision != "int8":
            return self.weight_float.to(dtype)
        view = (-1,) + (1,) * (self.weight_int8.dim() - 1)
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype).view(view)

    def plain_forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias) if self.conv is None else F.conv2d(x, weight, bias, **self.conv)

    def forward(self, x):
        trainable_bias = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or trainable_bias):
            return FrozenWeightOp.apply(x, self.bias, self)
        return self.plain_forward(x)


# ---------------------------------------------------------------------------------------------
# The network, rebuilt from the manifest's description (module names = the package's)


class Sequence(nn.Module):
    def __init__(self, children):
        super(Sequence, self).__init__()
        for name, spec in children:
            self.add_module(name, build_module(spec))

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x


class InvertedResidual(nn.Module):
    def __init__(self, spec):
        super(InvertedResidual, self).__init__()
        self.body_name, self.residual, self.inplace_add = spec["body"], spec["residual"], spec["inplace_add"]
        self.add_module(self.body_name, Sequence(spec["children"]))

    def forward(self, x):
        out = self._modules[self.body_name](x)
        if not self.residual:
            return out
        if self.inplace_add:  # as torchvision's MobileNetV3 block: no new tensor for the sum
            out += x
            return out
        return x + out


class SqueezeExcitation(nn.Module):
    def __init__(self, spec):
        super(SqueezeExcitation, self).__init__()
        for name, child in spec["children"]:
            self.add_module(name, build_module(child))

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class ResidualBlock(nn.Module):
    """A ResNet BasicBlock / Bottleneck: convs and BNs, ReLU after each but the last, then add."""

    def __init__(self, spec):
        super(ResidualBlock, self).__init__()
        for name, child in spec["children"]:
            self.add_module(name, build_module(child))
        self.stages = spec["stages"]

    def forward(self, x):
        out = x
        for i in range(1, self.stages + 1):
            out = self._modules["bn{}".format(i)](self._modules["conv{}".format(i)](out))
            if i < self.stages:
                out = self.relu(out)
        shortcut = self.downsample(x) if "downsample" in self._modules else x
        return self.relu(out + shortcut)


class LiteResidual(nn.Module):
    """TinyTL's lite residual patch around a block: main(x) + upsample(patch(x))."""

    def __init__(self, spec):
        super(LiteResidual, self).__init__()
        for name, child in spec["children"]:
            self.add_module(name, build_module(child))

    def forward(self, x):
        out = self.main(x)
        return out + F.interpolate(self.patch(x), size=out.shape[-2:], mode="bilinear", align_corners=False)


class Network(nn.Module):
    """Stem, blocks and fusion (``features`` or a ResNet's stages), global pooling, classifier."""

    def __init__(self, spec):
        super(Network, self).__init__()
        self.layout = spec["layout"]
        for name, child in spec["children"]:
            self.add_module(name, build_module(child))
        if spec.get("bottom_output"):  # the frozen bottom hands on the default memory layout
            self.get_module(spec["bottom_output"]).register_forward_hook(contiguous_output)

    def get_module(self, path):
        module = self
        for part in path.split("."):
            module = module._modules[part]
        return module

    def forward(self, x):
        if self.layout == "resnet":
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for name in ("layer1", "layer2", "layer3", "layer4"):
                x = self._modules[name](x)
            x = self.avgpool(x)
        else:
            x = self.features(x)
            x = F.adaptive_avg_pool2d(x, (1, 1)) if self.layout == "mobilenet_v2" else self.avgpool(x)
        x = torch.flatten(x, 1)
        return (self.fc if self.layout == "resnet" else self.classifier)(x)


def contiguous_output(module, inputs, output):
    return output.contiguous()


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def build_module(spec):
    kind = spec["type"]
    if kind == "sequential":
        return Sequence(spec["children"])
    if kind == "conv2d":
        return nn.Conv2d(spec["in"], spec["out"], _pair(spec["kernel"]), _pair(spec["stride"]),
                         _pair(spec["padding"]), _pair(spec["dilation"]), spec["groups"], spec["bias"])
    if kind == "linear":
        return nn.Linear(spec["in"], spec["out"], spec["bias"])
    if kind == "frozen":
        return FrozenLayer(spec)
    if kind == "batchnorm":
        return nn.BatchNorm2d(spec["features"], eps=spec["eps"], momentum=spec["momentum"])
    if kind == "groupnorm":
        return nn.GroupNorm(spec["groups"], spec["channels"], spec["eps"], spec["affine"])
    if kind == "shift_only_bn":
        return ShiftOnlyBatchNorm2d(spec["features"], spec["eps"], spec["train_shift"])
    if kind == "activation":
        return Activation(spec["kind"], spec.get("sign", False), spec.get("inplace", False))
    if kind == "inverted_residual":
        return InvertedResidual(spec)
    if kind == "squeeze_excitation":
        return SqueezeExcitation(spec)
    if kind == "residual_block":
        return ResidualBlock(spec)
    if kind == "lite_residual":
        return LiteResidual(spec)
    if kind == "dropout":
        return nn.Dropout(spec["p"], inplace=spec["inplace"])
    if kind == "identity":
        return nn.Identity()
    if kind == "flatten":
        return nn.Flatten()
    if kind == "adaptive_avgpool":
        return nn.AdaptiveAvgPool2d(spec["output"])
    if kind == "avgpool":
        return nn.AvgPool2d(spec["kernel"], spec["stride"], spec["padding"], spec["ceil_mode"],
                            spec["count_include_pad"])
    if kind == "maxpool":
        return nn.MaxPool2d(spec["kernel"], spec["stride"], spec["padding"], spec["dilation"],
                            ceil_mode=spec["ceil_mode"])
    raise BundleError("the manifest describes a layer of unknown type {!r}: this run.py is older than "
                      "the bundle".format(kind))


def build_network(manifest, state, trainable):
    """The network with the bundle's weights; exactly the tensors named in ``trainable`` train."""
    network = Network(manifest["network"])
    own = network.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise BundleError("the bundle's tensors do not fit its network description: missing {}, unexpected "
                          "{}".format(missing[:3], unexpected[:3]))
    for name in own:
        if tuple(own[name].shape) != tuple(state[name].shape):
            raise BundleError("tensor {} has shape {}, the network needs {}".format(
                name, tuple(state[name].shape), tuple(own[name].shape)))
    network.load_state_dict(state)
    trainable = set(trainable)
    for name, p in network.named_parameters():
        p.requires_grad_(name in trainable)
    return network


def trained_state(network):
    """What training changes: the trainable parameters and the full BatchNorms' statistics."""
    names = set(n for n, p in network.named_parameters() if p.requires_grad)
    for module_name, module in network.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            names.update("{}.{}".format(module_name, b) for b, _ in module.named_buffers())
    return dict((k, v) for k, v in network.state_dict().items() if k in names)


# ---------------------------------------------------------------------------------------------
# Training, with checkpoints that resume exactly


def step_seed(seed, epoch, step):
    """One seed per (seed, epoch, step): a resumed run draws what an uninterrupted one drew."""
    return int(hashlib.sha256("{}/{}/{}".format(seed, epoch, step).encode()).hexdigest()[:15], 16)


def make_optimizer(network, lr):
    return torch.optim.Adam([p for p in network.parameters() if p.requires_grad], lr=lr)


def train_step(network, optimizer, criterion, inputs, targets):
    """One step of the Table 6 protocol: zero_grad, forward, loss, backward, Adam. Returns the loss
    tensor and the logits."""
    optimizer.zero_grad()
    logits = network(inputs)
    loss = criterion(logits, targets)
    loss.backward()
    optimizer.step()
    return loss, logits


def _tensor_steps():
    """Does this torch's Adam keep its step count as a tensor (1.12 and later) or a number?"""
    probe = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([probe])
    probe.grad = torch.zeros(1)
    optimizer.step()
    return torch.is_tensor(optimizer.state[probe]["step"])


def optimizer_tensors(optimizer):
    """Adam's moments as named tensors and its step counts as numbers (portable across torch)."""
    tensors, steps = {}, {}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        state = optimizer.state.get(p) or {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors["optimizer.{}.{}".format(i, key)] = state[key]
        if "step" in state:
            steps[str(i)] = float(state["step"])
    return tensors, steps


def restore_optimizer(optimizer, tensors, steps):
    as_tensor = _tensor_steps()
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        if str(i) in steps:
            step = steps[str(i)]
            optimizer.state[p] = {
                "step": torch.tensor(step) if as_tensor else int(step),
                "exp_avg": tensors["optimizer.{}.exp_avg".format(i)].to(p.device),
                "exp_avg_sq": tensors["optimizer.{}.exp_avg_sq".format(i)].to(p.device)}


def image_folder(root, class_names=None):
    """``(paths and labels, class names)`` of an image folder, one sub-folder per class."""
    if not os.path.isdir(root):
        raise BundleError("image folder {} does not exist".format(root))
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not found:
        raise BundleError("image folder {} has no class sub-folders (one per class, holding its images)".format(root))
    if class_names is not None:  # the bundle's order numbers the classes
        if sorted(class_names) != found:
            raise BundleError("image folder {} has classes {}; the bundle was made for {}".format(
                root, found, list(class_names)))
        found = list(class_names)
    samples = []
    for label, name in enumerate(found):
        folder = os.path.join(root, name)
        for file_name in sorted(os.listdir(folder)):
            if file_name.lower().endswith(IMAGE_SUFFIXES):
                samples.append((os.path.join(folder, file_name), label))
    if not samples:
        raise BundleError("image folder {} holds no images ({})".format(root, ", ".join(IMAGE_SUFFIXES)))
    return samples, found


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise BundleError("reading images needs Pillow: pip3 install pillow")
    return Image


def _random_resized_crop(width, height, rng):
    """A crop box of random area (TRAIN_CROP_SCALE) and aspect ratio (3/4 to 4/3), as torchvision."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*TRAIN_CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_image(path, manifest, rng=None):
    """An image as a normalised 3 x size x size tensor: random crop and flip when ``rng`` is
    given (training), else resize to size * 256 / 224 and centre crop (evaluation)."""
    Image, size = _pil(), manifest["input"]["size"]
    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as error:
        raise BundleError("cannot read image {}: {}".format(path, error))
    if rng is not None:
        image = image.resize((size, size), Image.BILINEAR, box=_random_resized_crop(image.width, image.height, rng))
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        short = int(round(size * 256 / 224))
        scale = short / min(image.width, image.height)
        image = image.resize((max(short, int(round(image.width * scale))), max(short, int(round(image.height * scale)))),
                             Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.empty(size * size * 3, dtype=torch.uint8)
    raw = bytearray(image.tobytes())
    ctypes.memmove(pixels.data_ptr(), (ctypes.c_char * len(raw)).from_buffer(raw), len(raw))
    x = pixels.view(size, size, 3).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(manifest["input"]["mean"]).view(3, 1, 1)
    std = torch.tensor(manifest["input"]["std"]).view(3, 1, 1)
    return (x - mean) / std


def memory_report(device):
    """The memory the operating system saw: this process's peak resident set (and CUDA's peak)."""
    peak = None
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    report = {"peak_resident_bytes": peak}
    if device.type == "cuda":
        report["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return report


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bundle(object):
    """A verified bundle: manifest, network on a device, and the folder it came from."""

    def __init__(self, folder, device="cpu"):
        self.folder, self.device = folder, torch.device(device)
        self.manifest, state, self.trainable = read_bundle(folder)
        self.network = build_network(self.manifest, state, self.trainable).to(self.device)
        self.classes = self.manifest["classes"]

    @property
    def name(self):
        m = self.manifest
        return m["method"] + ("-{}".format(m["blocks"]) if m.get("blocks") else "")

    def random_batch(self, batch, generator=None, size=None):
        size = size or self.manifest["input"]["size"]
        inputs = torch.randn(batch, 3, size, size, generator=generator)
        targets = torch.randint(0, self.classes, (batch,), generator=generator)
        return inputs.to(self.device), targets.to(self.device)

    def load_trained(self, out):
        """Overlay the last checkpoint in ``out``; ``(its state record, its tensors)``, or
        ``(None, {})`` when there is none."""
        path = os.path.join(out, CHECKPOINT_FILE)
        if not os.path.isfile(path):
            return None, {}
        tensors, state = load_checkpoint(path)
        if state.get("bundle_files") != self.manifest["files"]:
            raise BundleError("{} was trained from another bundle (its files differ from this one's)".format(path))
        model = dict((k[len("model."):], v) for k, v in tensors.items() if k.startswith("model."))
        own = self.network.state_dict()
        unknown = [k for k in model if k not in own]
        if unknown:
            raise BundleError("{} does not belong to this bundle (unknown tensors {})".format(path, unknown[:3]))
        with torch.no_grad():
            for name, value in model.items():
                own[name].copy_(value)
        return state, tensors


RECIPE_KEYS = ("epochs", "batch", "lr", "label_smoothing", "seed")


def fit(bundle, args):
    """Fine-tune on an image folder; a checkpoint after every epoch (and every N steps)."""
    manifest, network, device = bundle.manifest, bundle.network, bundle.device
    asked = dict((k, getattr(args, k)) for k in RECIPE_KEYS if getattr(args, k) is not None)
    recipe = dict(manifest["train"], seed=0)
    recipe.update(asked)
    samples, class_names = image_folder(args.data, manifest.get("class_names"))
    if len(class_names) != bundle.classes:
        raise BundleError("image folder {} has {} classes; the bundle's classifier has {}".format(
            args.data, len(class_names), bundle.classes))
    out = args.out or os.path.join(bundle.folder, "training")
    state, tensors = bundle.load_trained(out)
    if state is not None and not args.resume:
        raise BundleError("{} already holds a training checkpoint: pass --resume to continue it, or "
                          "--out DIR for a new run".format(out))
    if state is None and args.resume:
        raise BundleError("--resume: {} holds no checkpoint to continue".format(out))
    if state is not None:
        differ = dict((k, (v, state["recipe"][k])) for k, v in asked.items() if v != state["recipe"][k])
        if differ:
            raise BundleError("cannot resume {} with other settings (asked, had): {}".format(out, differ))
        recipe = state["recipe"]
    steps_per_epoch = -(-len(samples) // recipe["batch"])
    optimizer = make_optimizer(network, recipe["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe["epochs"] * steps_per_epoch)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    progress = {"epoch": 0, "step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "history": []}
    if state is not None:
        restore_optimizer(optimizer, tensors, state["optimizer_steps"])
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the annealed rate, which the scheduler set before the interruption
        progress = state["progress"]
        print("resuming {} at epoch {}, step {}".format(out, progress["epoch"] + 1, progress["step"]), flush=True)
    if not os.path.isdir(out):
        os.makedirs(out)

    def save():
        saved = dict(("model." + k, v) for k, v in trained_state(network).items())
        moments, steps = optimizer_tensors(optimizer)
        saved.update(moments)
        save_checkpoint(os.path.join(out, CHECKPOINT_FILE), saved, {
            "progress": progress, "recipe": recipe, "class_names": class_names, "optimizer_steps": steps,
            "scheduler": scheduler.state_dict(), "bundle_files": manifest["files"],
            "data": os.path.abspath(args.data), "torch": torch.__version__})

    network.train()
    times, p = [], progress
    while p["epoch"] < recipe["epochs"]:
        order = list(range(len(samples)))
        random.Random(step_seed(recipe["seed"], p["epoch"], "order")).shuffle(order)
        while p["step"] < steps_per_epoch:
            chosen = order[p["step"] * recipe["batch"]:(p["step"] + 1) * recipe["batch"]]
            seed = step_seed(recipe["seed"], p["epoch"], p["step"])
            rng = random.Random(seed)
            torch.manual_seed(seed)  # dropout
            inputs = torch.stack([load_image(samples[i][0], manifest, rng) for i in chosen]).to(device)
            targets = torch.tensor([samples[i][1] for i in chosen]).to(device)
            _sync(device)
            started = time.perf_counter()
            loss, logits = train_step(network, optimizer, criterion, inputs, targets)
            _sync(device)
            times.append(time.perf_counter() - started)
            scheduler.step()
            value = loss.item()
            if not math.isfinite(value):
                raise BundleError("the loss became {} at epoch {}, step {}: try a lower --lr; the last good "
                                  "checkpoint is kept in {}".format(value, p["epoch"] + 1, p["step"] + 1, out))
            p["loss_sum"] += value * len(chosen)
            p["correct"] += int((logits.argmax(1) == targets).sum())
            p["seen"] += len(chosen)
            p["step"] += 1
            if p["step"] % args.print_every == 0 or p["step"] == steps_per_epoch:
                print("epoch {}/{} step {}/{}: loss {:.4f}, train top-1 {:.1f}%, {:.3f} s/step".format(
                    p["epoch"] + 1, recipe["epochs"], p["step"], steps_per_epoch, p["loss_sum"] / p["seen"],
                    100.0 * p["correct"] / p["seen"], times[-1]), flush=True)
            interrupted = args.max_steps and len(times) >= args.max_steps
            if p["step"] < steps_per_epoch and (interrupted or (
                    args.checkpoint_every and p["step"] % args.checkpoint_every == 0)):
                save()
            if interrupted and p["step"] < steps_per_epoch:
                print("stopped after --max-steps {}; continue with --resume".format(args.max_steps), flush=True)
                return 0
        row = {"epoch": p["epoch"] + 1, "train_loss": p["loss_sum"] / p["seen"],
               "train_top1": 100.0 * p["correct"] / p["seen"]}
        if args.val:
            row.update(evaluate(bundle, args.val, class_names))
        p["history"].append(row)
        p.update(epoch=p["epoch"] + 1, step=0, loss_sum=0.0, correct=0, seen=0)
        save()
        print("epoch {} done: {}".format(row["epoch"], ", ".join(
            "{} {:.1f}%".format(k.replace("_top1", " top-1"), v) if k.endswith("top1")
            else "{} {:.4f}".format(k.replace("_", " "), v)
            for k, v in row.items() if k != "epoch")), flush=True)
        if args.max_steps and len(times) >= args.max_steps and p["epoch"] < recipe["epochs"]:
            print("stopped after --max-steps {}; continue with --resume".format(args.max_steps), flush=True)
            return 0
    report = memory_report(device)
    if times:
        report["median_step_s"] = sorted(times)[len(times) // 2]
    print("finished; checkpoint in {}".format(os.path.join(out, CHECKPOINT_FILE)), flush=True)
    print(_describe(report), flush=True)
    return 0


def _describe(report):
    parts = []
    for key, value in sorted(report.items()):
        if key.endswith("_bytes") and value is not None:
            parts.append("{} {:.1f} MB".format(key[:-6].replace("_", " "), value / 1e6))
        elif key.endswith("_s"):
            parts.append("{} {:.3f} s".format(key[:-2].replace("_", " "), value))
    return ", ".join(parts)


def evaluate(bundle, folder, class_names):
    samples, _ = image_folder(folder, class_names)
    network, was_training = bundle.network, bundle.network.training
    network.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), 32):
            chunk = samples[start:start + 32]
            inputs = torch.stack([load_image(p, bundle.manifest) for p, _ in chunk]).to(bundle.device)
            targets = torch.tensor([label for _, label in chunk]).to(bundle.device)
            logits = network(inputs)
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(1) == targets).sum())
    network.train(was_training)
    return {"val_loss": loss_sum / len(samples), "val_top1": 100.0 * correct / len(samples)}


def predict(bundle, args):
    out = args.out or os.path.join(bundle.folder, "training")
    state, _ = bundle.load_trained(out)
    names = (state or {}).get("class_names") or bundle.manifest.get("class_names") or [
        "class {}".format(i) for i in range(bundle.classes)]
    bundle.network.eval()
    with torch.no_grad():
        probabilities = F.softmax(bundle.network(load_image(args.predict, bundle.manifest)[None].to(bundle.device)), 1)[0]
    top = probabilities.topk(min(args.top, bundle.classes))
    source = "fine-tuned on the device" if state else "as bundled (not fine-tuned yet)"
    print("{} ({}):".format(args.predict, source))
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        print("  {:6.2f}%  {}".format(100 * p, names[i]))
    return 0


# ---------------------------------------------------------------------------------------------
# Latency: the Table 6 protocol, and the latency model's constants


def summarize(times):
    ordered = sorted(times)
    n = len(ordered)
    mean = sum(ordered) / n
    return {"steps": n, "mean_s": mean, "median_s": ordered[n // 2], "min_s": ordered[0], "max_s": ordered[-1],
            "q1_s": ordered[n // 4], "q3_s": ordered[(3 * n) // 4],
            "std_s": math.sqrt(sum((t - mean) ** 2 for t in ordered) / max(n - 1, 1))}


def time_steps(setups, steps, warmup, device):
    """Seconds of each training step of each setup ``(name, network, optimizer, criterion, inputs,
    targets)``, the setups taking turns step by step so that the machine's noise hits them alike;
    the first ``warmup`` rounds are not timed. CUDA is synchronized around every step."""
    times = dict((setup[0], []) for setup in setups)
    for step in range(warmup + steps):
        for name, network, optimizer, criterion, inputs, targets in setups:
            _sync(device)
            started = time.perf_counter()
            train_step(network, optimizer, criterion, inputs, targets)
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - started)
    return times


def compare(times):
    """Mean, median and spread per setup, and the first setup's mean over each setup's mean."""
    results = dict((name, summarize(t)) for name, t in times.items())
    first = next(iter(results.values()))["mean_s"]
    for result in results.values():
        result["ratio_to_first"] = first / result["mean_s"]
    return results


def bench(bundles, steps, warmup, batch, device, size=None):
    """The Table 6 protocol on random data (batch x 3 x size x size, the bundles' classes)."""
    generator = torch.Generator().manual_seed(0)
    setups = []
    for i, b in enumerate(bundles):
        b.network.train()
        inputs, targets = b.random_batch(batch, generator, size)
        name = b.name if b.name not in [s[0] for s in setups] else "{} ({})".format(b.name, i + 1)
        setups.append((name, b.network, make_optimizer(b.network, 1e-6), nn.CrossEntropyLoss(), inputs, targets))
    return compare(time_steps(setups, steps, warmup, device))


def _best_time(function, repeats):
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def calibrate(device, repeats=5):
    """Micro-benchmarks for the latency model: a large matrix product (compute rate), a large
    copy (bandwidth), many tiny additions (per-operation overhead)."""
    n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    big = torch.empty(8 * 1024 * 1024, device=device)
    tiny = torch.zeros(1, device=device)

    def matmul():
        torch.mm(a, b)
        _sync(device)

    def copy():
        big.clone()
        _sync(device)

    def tiny_ops():
        x = tiny
        for _ in range(200):
            x = x + 1
        _sync(device)

    matmul(), copy(), tiny_ops()
    return {"matmul_flops_per_s": 2.0 * n ** 3 / _best_time(matmul, repeats),
            "copy_bytes_per_s": 2.0 * big.numel() * 4 / _best_time(copy, repeats),
            "op_overhead_s": _best_time(tiny_ops, repeats) / 200, "threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------
# The command line


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Fine-tune this MobileTL training bundle on the device.")
    parser.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)),
                        help="the bundle folder (default: the folder of this file)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="verify the bundle and run one step on random data")
    what.add_argument("--bench", action="store_true", help="time training steps on random data (Table 6)")
    what.add_argument("--data", help="fine-tune on this image folder (one sub-folder per class)")
    what.add_argument("--predict", help="classify this image")
    what.add_argument("--calibrate", action="store_true", help="measure the latency model's constants")
    parser.add_argument("--val", help="with --data: evaluate on this image folder after every epoch")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch", type=int, help="batch size (default: the bundle's, 8)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", help="checkpoint folder (default: BUNDLE/training)")
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    parser.add_argument("--max-steps", type=int, default=0, help="stop (with a checkpoint) after N steps")
    parser.add_argument("--print-every", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="--bench: timed steps per bundle")
    parser.add_argument("--warmup", type=int, default=5, help="--bench: untimed steps first")
    parser.add_argument("--resolution", type=int, help="--bench: image size (default: the bundle's)")
    parser.add_argument("--with", dest="others", default="",
                        help="--bench: more bundle folders, comma-separated, timed interleaved with this one")
    parser.add_argument("--top", type=int, default=3, help="--predict: how many classes to show")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the Jetson Nano's GPU)")
    parser.add_argument("--json", action="store_true", help="--bench / --calibrate: print JSON")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch", "steps", "print_every", "top", "threads", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error("--{} must be a positive integer, got {}".format(name.replace("_", "-"), value))
    if args.warmup < 0 or args.checkpoint_every < 0 or args.max_steps < 0:
        parser.error("--warmup, --checkpoint-every and --max-steps must be 0 or more")
    return args


def _device(name):
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise BundleError("--device must be cpu or cuda, got {!r}".format(name))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BundleError("--device {} asked for, but this torch sees no CUDA device".format(name))
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        device = _device(args.device)
        if args.calibrate:
            constants = calibrate(device)
            print(json.dumps(constants, indent=2) if args.json else "\n".join(
                "{:<20} {}".format(k, v) for k, v in sorted(constants.items())))
            return 0
        bundle = Bundle(args.bundle, device)
        if args.bench:
            others = [Bundle(folder, device) for folder in args.others.split(",") if folder]
            size = args.resolution or bundle.manifest["input"]["size"]
            results = bench([bundle] + others, args.steps, args.warmup, args.batch or 8, device, size)
            report = {"results": results, "memory": memory_report(device), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "batch": args.batch or 8, "resolution": size}
            if args.json:
                print(json.dumps(report, indent=2))
            else:
                print("{:<16}{:>10}{:>10}{:>10}{:>10}{:>12}".format("bundle", "mean s", "median s", "q1 s", "q3 s",
                                                                  "first/this"))
                for name, r in results.items():
                    print("{:<16}{:>10.4f}{:>10.4f}{:>10.4f}{:>10.4f}{:>11.2f}x".format(
                        name, r["mean_s"], r["median_s"], r["q1_s"], r["q3_s"], r["ratio_to_first"]))
                print("{} threads, torch {}; {}".format(report["threads"], torch.__version__,
                                                        _describe(report["memory"])))
            return 0
        if args.data:
            return fit(bundle, args)
        if args.predict:
            return predict(bundle, args)
        bundle.network.train()
        optimizer, criterion = make_optimizer(bundle.network, 1e-6), nn.CrossEntropyLoss()
        inputs, targets = bundle.random_batch(2, torch.Generator().manual_seed(0))
        torch.manual_seed(0)  # dropout
        started = time.perf_counter()
        loss, _ = train_step(bundle.network, optimizer, criterion, inputs, targets)
        print("bundle {} verified: {} {} ({} trainable tensors), one step on random data: loss {:.4f}, "
              "{:.2f} s; torch {}; {}".format(args.bundle, bundle.manifest["model"], bundle.name, len(bundle.trainable),
                                              loss.item(), time.perf_counter() - started, torch.__version__,
                                              _describe(memory_report(device))))
        return 0
    except BundleError as error:
        print("run.py: error: {}".format(error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("run.py: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
