"""``prepare(model, method, blocks)``: every fine-tuning strategy of the paper in one call.

Each method is three decisions, taken in this order:

1. which parameters train (everything else is frozen);
2. what the trained blocks become (MobileTL: shift-only intermediate BNs, full last BN,
   sign-approximated activations; ablations change one of these; TinyTL adds patches);
3. what frozen layers become: a frozen conv/linear turns into an int8 ``FrozenLayer`` that never
   saves its input, a BN with a frozen scale turns into ``ShiftOnlyBatchNorm2d`` (its shift
   trains or not). Below the first trained parameter nothing requires grad, so autograd records
   nothing there: the frozen bottom keeps no activations.

The frozen bottom then only runs inference, so it is prepared as an inference engine would be
(``optimize_bottom=True``): each frozen BN is folded into the conv before it, the convs run on
channels_last maps, and the bottom's output is handed to the trained blocks in the default
(contiguous) layout, so that the trained part runs exactly as in every other method.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from .choices import (BLOCK_METHODS, FROZEN_BOTTOM_METHODS, GLOBAL_METHODS, METHODS, MOBILETL_FULL_BN,  # noqa: F401
                      PRECISIONS, SINGLE_BLOCK_METHODS, check_choice)
from .models import RESNET_BLOCKS, Unit, build_model, check_positive, find_units, has_squeeze_excitation, norm_roles, set_submodule
from .ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from .quant import FrozenLayer, freeze_layers

SIGN_APPROXIMATION = {nn.Hardswish: SignHardswish, nn.ReLU6: SignReLU6, nn.ReLU: SignReLU}


class Prepared(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer


def prepare(model, method: str, blocks: int | None = None, *, num_classes: int = 1000,
            lr: float = 3e-4, frozen_precision: str = "int8", optimize_bottom: bool = True,
            resolution: int = 224, bottom_chunk: int | None = None) -> Prepared:
    """Turn ``model`` (a module, or a name from ``MODEL_NAMES``) into a fine-tuning setup.

    Returns the model (modified in place) and an Adam optimizer over its trainable parameters.
    ``optimize_bottom=False`` leaves the frozen bottom's BNs and layout as they are (for comparison).
    ``resolution`` (the input side) sizes TinyTL's patches; the other methods do not use it.
    ``bottom_chunk=c`` runs the frozen bottom ``c`` samples at a time (see ``set_bottom_chunk``).
    """
    if bottom_chunk is not None:
        check_bottom_chunk(bottom_chunk, method)
    check_choice("method", method, METHODS)
    check_choice("frozen_precision", frozen_precision, PRECISIONS)
    if isinstance(model, str):
        model = build_model(model, num_classes)
    _refuse_prepared(model)
    units = find_units(model)
    top = _top_blocks(units, method, blocks)
    check_positive(resolution=resolution)

    for p in model.parameters():
        p.requires_grad_(False)
    _choose_trainable(model, units, top, method)
    geometry = _block_geometry(model, [u.path for u in top], resolution) if "tinytl" in method else None
    for unit in top:
        _rebuild_block(model, unit, method, geometry)
    _freeze_rest(model, frozen_precision)
    if optimize_bottom:
        _optimize_bottom(model, frozen_bottom(model, units))
    if bottom_chunk is not None:
        set_bottom_chunk(model, bottom_chunk)

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return Prepared(model, torch.optim.Adam(trainable, lr=lr))


def prepare_block(block: nn.Module, method: str, frozen_precision: str = "int8") -> nn.Module:
    """One block on its own, made what ``prepare`` makes of a trained top block (Table 1, Figure 1)."""
    if method not in SINGLE_BLOCK_METHODS:
        raise ValueError(f"method {method!r} does not apply to a single block; "
                         f"valid choices: {', '.join(SINGLE_BLOCK_METHODS)}")
    for p in block.parameters():
        p.requires_grad_(True)
    _rebuild_block(block, Unit("", "block"), method)  # path "": the block is its own root
    _freeze_rest(block, frozen_precision)
    return block.train()


PREPARED_LAYERS = (FrozenLayer, ShiftOnlyBatchNorm2d, SignHardswish, SignReLU6, SignReLU)


def _refuse_prepared(model: nn.Module) -> None:
    """prepare() changes a model in place: a second call would mix two setups (wrong trainable set)."""
    changed = next((name for name, m in model.named_modules()
                    if isinstance(m, (*PREPARED_LAYERS, LiteResidual))), None)
    if changed is not None:
        raise ValueError(f"this model was already changed by prepare() ({changed or 'the model'} is a "
                         f"{type(model.get_submodule(changed)).__name__}); prepare a fresh model: "
                         f"build_model(name) and load its weights again, or mobiletl_edu.load_trained(run)")


def _top_blocks(units: list[Unit], method: str, blocks) -> list[Unit]:
    all_blocks = [u for u in units if u.role == "block"]
    if method in GLOBAL_METHODS:
        if blocks is not None:
            raise ValueError(f"method {method!r} does not take blocks (got blocks={blocks!r}); "
                             f"block-wise methods are: {', '.join(BLOCK_METHODS)}")
        return []
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(all_blocks):
        raise ValueError(f"method {method!r} needs blocks between 1 and {len(all_blocks)} "
                         f"(this model has {len(all_blocks)} blocks), got blocks={blocks!r}")
    return all_blocks[-blocks:]


def _choose_trainable(model: nn.Module, units: list[Unit], top: list[Unit], method: str) -> None:
    def train(module):
        for p in module.parameters():
            p.requires_grad_(True)

    classifier = [model.get_submodule(u.path) for u in units if u.role == "classifier"]
    for m in classifier:
        train(m)
    if method == "ft-all":
        train(model)
    elif method == "ft-bn":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                train(m)
    elif method == "ft-bias":
        # TinyTL-B: every bias (conv, linear, BN shift). Its BNs normalise with the frozen
        # statistics: batch statistics would make the input gradient need the whole input,
        # which TinyTL's accounting (BN input charged only when the scale trains) leaves out.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad_(True)
    elif method in BLOCK_METHODS:  # top blocks + fusion (Fig. 4); TinyTL's patches alone: fusion only
        for u in units:
            if u.role == "fusion" or (u in top and method != "tinytl-lite-residual"):
                train(model.get_submodule(u.path))


def _rebuild_block(model: nn.Module, unit: Unit, method: str, geometry: dict | None = None) -> None:
    block = model.get_submodule(unit.path)
    is_irb = not isinstance(block, RESNET_BLOCKS)
    if method in MOBILETL_FULL_BN or method == "mobiletl+tinytl-lite-residual":
        full = MOBILETL_FULL_BN.get(method, MOBILETL_FULL_BN["mobiletl"])
        roles = norm_roles(block)
        if not is_irb and method in ("mobiletl-exp-bn", "mobiletl-dw-bn"):
            raise ValueError(f"method {method!r} applies to inverted residual blocks; "
                             f"{unit.path} is a {type(block).__name__}")
        for name, role in roles.items():
            if role not in full:
                block.get_submodule(name).weight.requires_grad_(False)  # -> shift-only in _freeze_rest
        _replace_activations(block, lambda m: SIGN_APPROXIMATION[type(m)]())
    elif method == "remove-se":
        if not has_squeeze_excitation(block):
            raise ValueError(f"method 'remove-se' needs squeeze-excitation blocks; {unit.path} has none")
        _replace_modules(block, lambda m: isinstance(m, SqueezeExcitation), lambda m: nn.Identity())
    elif method == "relu":
        if not is_irb:
            raise ValueError(f"method 'relu' replaces Hard-Swish/ReLU6 in inverted residual blocks; "
                             f"{unit.path} is a {type(block).__name__}")
        _replace_activations(block, lambda m: nn.ReLU())
    if "tinytl-lite-residual" in method:
        set_submodule(model, unit.path, LiteResidual(block, *geometry[unit.path]))


def _replace_activations(block: nn.Module, make) -> None:
    """Replace the block's own activations (not those inside squeeze-excitation)."""
    def is_block_activation(m):
        return type(m) in SIGN_APPROXIMATION
    _replace_modules(block, is_block_activation, make, skip=SqueezeExcitation)


def _replace_modules(module: nn.Module, match, make, skip=()) -> None:
    for name, child in list(module.named_children()):
        if skip and isinstance(child, skip):
            continue
        if match(child):
            setattr(module, name, make(child))
        else:
            _replace_modules(child, match, make, skip)


def _freeze_rest(module: nn.Module, precision: str) -> None:
    """Frozen conv/linear -> FrozenLayer; BN with frozen scale -> ShiftOnlyBatchNorm2d."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear)) and not child.weight.requires_grad:
            trainable_bias = child.bias is not None and child.bias.requires_grad
            frozen = freeze_layers(child, precision)
            if trainable_bias:
                frozen.bias.requires_grad_(True)
            setattr(module, name, frozen)
        elif isinstance(child, nn.BatchNorm2d) and not child.weight.requires_grad:
            setattr(module, name, ShiftOnlyBatchNorm2d(child, train_shift=child.bias.requires_grad))
        else:
            _freeze_rest(child, precision)


def frozen_bottom(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """The leading units with no trainable parameter: they run without autograd."""
    bottom = []
    for unit in units:
        if any(p.requires_grad for p in model.get_submodule(unit.path).parameters()):
            break
        bottom.append(unit)
    return bottom


def _optimize_bottom(model: nn.Module, bottom: list[Unit]) -> None:
    """Fold frozen BNs into the frozen convs before them; make the convs run channels_last.

    Folding looks at neighbours in ``nn.Sequential`` containers only, where the order of the
    children is the order of the forward pass (MobileNets, ProxylessNAS; a ResNet block's own
    forward keeps its BNs). A hook on the bottom's last unit makes its output contiguous again.
    """
    if not bottom:
        return
    for unit in bottom:
        module = model.get_submodule(unit.path)
        for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
            children = list(seq.named_children())
            for (_, conv), (name, bn) in zip(children, children[1:]):
                if (isinstance(conv, FrozenLayer) and conv.conv_args is not None
                        and not conv.folded_batchnorm and isinstance(bn, ShiftOnlyBatchNorm2d)):
                    conv.absorb_batchnorm(bn)
                    setattr(seq, name, FoldedBatchNorm(bn))
        for m in module.modules():
            if isinstance(m, FrozenLayer):
                m.use_channels_last()
    model.get_submodule(bottom[-1].path).register_forward_hook(_contiguous_output)


class FoldedBatchNorm(nn.Identity):
    """Where a BatchNorm was before ``prepare`` folded it into the conv before it: passes its input
    on, and remembers the BN's size and eps so that ``export.plain_model`` can put a BN back."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.num_features, self.eps = bn.num_features, bn.eps

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, folded into the conv before it"


def _contiguous_output(module, args, output):
    return output.contiguous() if isinstance(output, torch.Tensor) else output


def check_bottom_chunk(chunk, method: str) -> None:
    """ValueError naming a chunk that is not a positive integer, or a method with no frozen bottom."""
    check_positive(bottom_chunk=chunk)
    if method not in FROZEN_BOTTOM_METHODS:
        raise ValueError(f"method {method!r} has no frozen bottom to run in chunks; bottom_chunk applies to: "
                         f"{', '.join(FROZEN_BOTTOM_METHODS)}")


def chunked_units(model: nn.Module) -> list[Unit]:
    """The frozen-bottom units that ``bottom_chunk`` runs in chunks: those before the head, whose
    outputs feed each other directly (after the head, a model's forward flattens the features)."""
    chain = []
    for unit in frozen_bottom(model, find_units(model)):
        if unit.role in ("head", "classifier") or unit.path.startswith("classifier"):
            break
        chain.append(unit)
    return chain


def set_bottom_chunk(model: nn.Module, chunk: int | None) -> None:
    """Run the frozen bottom's forward ``chunk`` samples at a time (``None``: the whole batch).

    The bottom keeps no activations, so only one chunk's maps live at once, plus the bottom's
    output, written chunk by chunk into one buffer. The output is bit for bit the whole batch's
    when the chunk and the batch get the same kernels, and else equal up to float32 rounding
    (we measured differences below 2e-6 of the output's largest value): PyTorch picks a
    convolution's kernel by batch size (``profiler.conv_kernel``: a 1x1 convolution on fewer
    than 16 samples runs PyTorch's own kernel with one thread, oneDNN's from 16 on), and
    another kernel sums in another order.
    """
    old = getattr(model, "_chunked_bottom", None)
    if old is not None:
        for module in old.modules:
            del module.forward  # the class's forward again
        del model._chunked_bottom
    if chunk is None:
        return
    check_positive(bottom_chunk=chunk)
    chain = chunked_units(model)
    if not chain:
        raise ValueError("this model has no frozen bottom to run in chunks (its lowest unit trains)")
    runner = _ChunkedBottom([model.get_submodule(u.path) for u in chain], chunk)
    runner.modules[0].forward = runner.first
    for module in runner.modules[1:]:
        module.forward = partial(runner.rest, module)
    model._chunked_bottom = runner


def bottom_chunk(model: nn.Module) -> int | None:
    """The chunk ``set_bottom_chunk`` gave the model's frozen bottom, or None."""
    runner = getattr(model, "_chunked_bottom", None)
    return None if runner is None else runner.chunk


class _ChunkedBottom:
    """The forward of the chunked units: the first runs them all, chunk by chunk; the others pass
    the result on. Inside the loop each unit is called as a module (its hooks run) with its own forward."""

    def __init__(self, modules: list, chunk: int):
        self.modules, self.chunk, self.inside, self.done = modules, chunk, False, False

    def first(self, x):
        first, self.done = self.modules[0], False
        if self.inside or x.shape[0] <= self.chunk or (torch.is_grad_enabled() and x.requires_grad):
            return type(first).forward(first, x)
        out, self.inside = None, True
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], self.chunk):
                    y = x[start:start + self.chunk]
                    for module in self.modules:
                        y = module(y)
                    if out is None:
                        out = y.new_empty((x.shape[0], *y.shape[1:]))
                    out[start:start + self.chunk] = y
        finally:
            self.inside = False
        self.done = True
        return out

    def rest(self, module, x):
        if self.done and not self.inside:
            self.done = module is not self.modules[-1]
            return x  # the first unit has run this one already
        return type(module).forward(module, x)


# TinyTL's lite residual patch (Cai et al. 2020, Section 3.2, and its released code): the input
# is average-pooled by 2, convolved by a grouped kxk conv (2 groups) and a 1x1 conv, each
# followed by group normalization (8 channels a group), upsampled and added to the block's
# output. The kernel shrinks with the resolution the patch sees: 5x5, or the largest odd size
# that fits the pooled map; where pooling by 2 leaves one pixel or less, the patch pools
# globally and its first conv is 1x1.
PATCH_MAX_KERNEL, PATCH_GROUPS, PATCH_POOL, PATCH_NORM_GROUP = 5, 2, 2, 8


class LiteResidual(nn.Module):
    """A block plus TinyTL's lite residual patch: ``main(x) + upsample(patch(x))``.

    ``resolution`` is the side of the block's input map and ``stride`` the block's stride; they
    set the patch's kernel and pooling (see ``PATCH_MAX_KERNEL``). The patch's width is the
    block's input width, as TinyTL's; for a block that narrows first (a ResNet bottleneck) it is
    the narrower width of the block's first conv, so a patch never outweighs a ResNet stage. The
    last normalization's scale starts at zero: the patched model starts equal to the original.
    """

    def __init__(self, main: nn.Module, resolution: int, stride: int = 1):
        super().__init__()
        convs = [m for m in main.modules() if isinstance(m, nn.Conv2d)]
        c_in, c_out = convs[0].in_channels, convs[-1].out_channels
        width = min(c_in, convs[0].out_channels)
        pooled = max(1, resolution // PATCH_POOL)
        kernel = 1 if pooled == 1 else max(k for k in range(1, PATCH_MAX_KERNEL + 1, 2) if k <= pooled)
        self.main = main
        self.patch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1) if pooled == 1 else nn.AvgPool2d(PATCH_POOL),
            nn.Conv2d(c_in, width, kernel, stride=1 if pooled == 1 else stride, padding=kernel // 2,
                      groups=PATCH_GROUPS if c_in % PATCH_GROUPS == 0 == width % PATCH_GROUPS else 1, bias=False),
            _group_norm(width),
            nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False),
            _group_norm(c_out),
        )
        nn.init.zeros_(self.patch[-1].weight)

    def forward(self, x):
        out = self.main(x)
        return out + F.interpolate(self.patch(x), size=out.shape[-2:], mode="bilinear", align_corners=False)


def _group_norm(channels: int) -> nn.GroupNorm:
    """TinyTL's group normalization: groups of 8 channels (one group if 8 does not divide)."""
    return nn.GroupNorm(channels // PATCH_NORM_GROUP if channels % PATCH_NORM_GROUP == 0 else 1, channels)


def _block_geometry(model: nn.Module, paths: list[str], resolution: int) -> dict[str, tuple[int, int]]:
    """(input side, stride) of each block in ``paths``, from one eval-mode forward pass on zeros."""
    found, handles = {}, []
    for path in paths:
        def record(module, args, output, path=path):
            side = min(args[0].shape[-2:])
            found[path] = (side, max(1, round(side / min(output.shape[-2:]))))
        handles.append(model.get_submodule(path).register_forward_hook(record))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def describe_layer(m: nn.Module) -> str | None:
    """What a normalization / activation / frozen layer became, in the paper's words."""
    if isinstance(m, ShiftOnlyBatchNorm2d):
        return "BN shift-only" if m.bias.requires_grad else "BN frozen"
    if isinstance(m, nn.BatchNorm2d):
        return "BN full" if m.weight.requires_grad else "BN frozen"
    if isinstance(m, (SignHardswish, SignReLU6, SignReLU)):
        return f"{type(m).__name__[4:]} sign (1-bit)"
    if isinstance(m, (nn.Hardswish, nn.ReLU6, nn.ReLU, nn.Hardsigmoid)):
        return f"{type(m).__name__} exact"
    if isinstance(m, FrozenLayer):
        return f"{m.kind} frozen {m.precision}" + (" + BN folded" if m.folded_batchnorm else "")
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        return f"{type(m).__name__} trained"
    return None


def summary(model: nn.Module) -> str:
    """One line per unit: role, trainable and frozen parameter counts, what its layers became."""
    lines = [f"{'unit':<18}{'role':<11}{'trainable':>11}{'frozen':>11}  layers"]
    totals = [0, 0]
    for unit in find_units(model):
        module = model.get_submodule(unit.path)
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
        frozen += sum(b.numel() for n, b in module.named_buffers() if n.endswith(("weight_int8", "weight_float")))
        totals[0] += trainable
        totals[1] += frozen
        kinds = [d for d in map(describe_layer, module.modules()) if d]
        counted = ", ".join(f"{kinds.count(k)}x {k}" for k in dict.fromkeys(kinds))
        lines.append(f"{unit.path:<18}{unit.role:<11}{trainable:>11,}{frozen:>11,}  {counted}")
    lines.append(f"{'total':<29}{totals[0]:>11,}{totals[1]:>11,}")
    return "\n".join(lines)
