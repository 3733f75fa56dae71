"""prepare(model, method, blocks): the intended parameters, and only those, train (mobiletl_edu.methods)."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobiletl_edu.measure import saved_activations
from mobiletl_edu.methods import GLOBAL_METHODS, METHODS, prepare, summary
from mobiletl_edu.models import MODEL_NAMES, block_units, build_model
from mobiletl_edu.quant import FrozenLayer

# MobileNetV3-Small, blocks=2 -> features.10 and features.11 train. Inside those blocks:
# block.0.1 = expansion BN, block.1.1 = depthwise BN, block.3.1 = projection BN.
TOP = r"features\.1[01]\."
FUSION_AND_CLASSIFIER = r"(features\.12\.|classifier\.[03]\.)"
BN_WEIGHT = {"expand": r"block\.0\.1\.weight", "depthwise": r"block\.1\.1\.weight", "project": r"block\.3\.1\.weight"}


def _mobiletl_rule(full_bns):
    frozen_scales = [BN_WEIGHT[r] for r in BN_WEIGHT if r not in full_bns]

    def rule(name):
        if re.match(FUSION_AND_CLASSIFIER, name):
            return True
        return bool(re.match(TOP, name)) and not any(re.search(s + "$", name) for s in frozen_scales)
    return rule


def _in_blocks_or_head(name):
    return bool(re.match(TOP, name) or re.match(FUSION_AND_CLASSIFIER, name))


# Independent statement of each method (names of the torchvision model's parameters).
TRAINED = {
    "ft-all": lambda n: True,
    "ft-last": lambda n: n.startswith("classifier.3."),
    "ft-bn": lambda n: n.startswith("classifier.3.") or bool(re.search(r"(\.1|block\.\d\.1)\.(weight|bias)$", n)
                                                              and not re.search(r"fc\d", n)),
    "ft-bias": lambda n: n.startswith("classifier.3.") or n.endswith(".bias"),
    "ft-blocks": _in_blocks_or_head,
    "remove-se": lambda n: _in_blocks_or_head(n) and not re.match(TOP + r"block\.2\.", n),
    "relu": _in_blocks_or_head,
    "mobiletl": _mobiletl_rule({"project"}),
    "mobiletl-exp-bn": _mobiletl_rule({"expand"}),
    "mobiletl-dw-bn": _mobiletl_rule({"depthwise"}),
    "mobiletl-all-bn-shift": _mobiletl_rule(set()),
    "mobiletl-all-bn": _mobiletl_rule({"expand", "depthwise", "project"}),
}
# running statistics that must change: BNs that train their scale
STATS_CHANGE = {
    "ft-all": lambda n: True, "ft-bn": lambda n: True,
    "ft-last": lambda n: False, "ft-bias": lambda n: False,
}


def _name_in_original(name):
    """Map a prepared model's parameter name back to the torchvision name."""
    return name.replace(".main.", ".")


def _step(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 48, 48, generator=g), torch.randint(0, 5, (4,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", sorted(TRAINED))
def test_one_step_changes_exactly_the_intended_parameters(method):
    torch.manual_seed(0)
    model, opt = prepare("mobilenet_v3_small", method, None if method in GLOBAL_METHODS else 2, num_classes=5)
    params = dict(model.named_parameters())
    before = _snapshot(model)
    _step(model, opt)
    after = model.state_dict()
    trained = TRAINED[method]
    for name in params:
        changed = not torch.equal(before[name], after[name])
        assert changed == trained(name), f"{method}: {name} changed={changed}, intended={trained(name)}"
    for name in before:  # buffers: int8 weights, scales, running statistics
        if name in params:
            continue
        changed = not torch.equal(before[name], after[name])
        module = model.get_submodule(name.rpartition(".")[0])
        stats_train = isinstance(module, nn.BatchNorm2d) and module.weight.requires_grad
        assert changed == stats_train, f"{method}: buffer {name} changed={changed}"
    if method in STATS_CHANGE:
        return
    # block-wise methods: the trained blocks' last BN updates its statistics
    for block in ("features.10", "features.11"):
        last_bn = f"{block}.block.3.1.running_mean"
        should = method != "mobiletl-all-bn-shift" and method not in ("mobiletl-exp-bn", "mobiletl-dw-bn")
        assert (not torch.equal(before[last_bn], after[last_bn])) == should


@pytest.mark.parametrize("method", ["tinytl-lite-residual", "mobiletl+tinytl-lite-residual"])
def test_lite_residual_patches_train(method):
    torch.manual_seed(0)
    model, opt = prepare("mobilenet_v3_small", method, 2, num_classes=5)
    before = _snapshot(model)
    _step(model, opt, steps=3)
    after = model.state_dict()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], after[name])
        original = _name_in_original(name)
        if ".patch." in name or re.match(FUSION_AND_CLASSIFIER, original):  # Table 5: fusion trains too
            intended = True
        elif method == "tinytl-lite-residual":
            intended = False
        else:
            intended = TRAINED["mobiletl"](original)
        assert changed == intended, f"{method}: {name}"


def test_lite_residual_starts_as_the_original_model():
    """The patch's last BN scale starts at zero, so patching does not change the function."""
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(0)
    reference = build_model("mobilenet_v3_small", 5).eval()
    torch.manual_seed(0)
    patched = prepare(build_model("mobilenet_v3_small", 5), "tinytl-lite-residual", 3,
                      frozen_precision="float").model.eval()
    assert torch.allclose(reference(x), patched(x), atol=1e-4)


# Table 5 (ProxylessNAS-Mobile, CIFAR10: 10 classes, top three blocks), trainable parameters.
TABLE5 = {"ft-blocks": 1_580_682, "mobiletl": 1_576_074, "mobiletl+tinytl-lite-residual": 2_211_466,
          "tinytl-lite-residual": 1_060_362}


@pytest.mark.parametrize("method", sorted(TABLE5))
def test_trainable_parameters_equal_table5(method):
    model = prepare("proxyless_mobile", method, 3, num_classes=10, resolution=224).model
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == TABLE5[method]


def test_lite_residual_follows_tinytl_design():
    """At 224 px the top blocks see 7x7 maps: pooled by 2 (floor) to 3x3, a 3x3 grouped conv fits;
    at 64 px they see 2x2 maps, pooled to one pixel: global pooling and a 1x1 conv."""
    for resolution, pool, kernel, pooled in ((224, nn.AvgPool2d, 3, 3), (64, nn.AdaptiveAvgPool2d, 1, 1)):
        model = prepare("proxyless_mobile", "tinytl-lite-residual", 3, num_classes=10, resolution=resolution).model
        patch = model.features[-2].patch
        assert isinstance(patch[0], pool) and not getattr(patch[0], "ceil_mode", False)
        assert patch[1].kernel_size == (kernel, kernel) and patch[1].groups == 2
        assert isinstance(patch[2], nn.GroupNorm) and patch[2].num_groups == patch[2].num_channels // 8
        assert isinstance(patch[5], nn.GroupNorm) and not patch[5].weight.any()
        seen = {}
        patch[1].register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
        model(torch.randn(1, 3, resolution, resolution))
        assert seen["x"].shape[-1] == pooled


def test_resnet50_patches_train_fewer_parameters_than_the_network():
    network = sum(p.numel() for p in build_model("resnet50", 10).parameters())
    patched = prepare("resnet50", "tinytl-lite-residual", 3, num_classes=10).model
    assert sum(p.numel() for p in patched.parameters() if p.requires_grad) < network


@pytest.mark.parametrize("method", ["mobiletl", "ft-last", "tinytl-lite-residual"])
def test_preparing_a_prepared_model_is_refused(method):
    model = prepare("mobilenet_v3_small", method, None if method in GLOBAL_METHODS else 2, num_classes=5).model
    before = _snapshot(model)
    with pytest.raises(ValueError, match="already changed by prepare"):
        prepare(model, "ft-bias")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_model_prepares_and_trains_for_mobiletl(model_name):
    torch.manual_seed(0)
    model, opt = prepare(model_name, "mobiletl", 2, num_classes=5)
    before = _snapshot(model)
    _step(model, opt, steps=1)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing trained"
    text = summary(model)
    assert "sign (1-bit)" in text and "BN shift-only" in text and "BN full" in text


@pytest.mark.parametrize("model_name", ["mobilenet_v2", "mobilenet_v3_small", "resnet18", "proxyless_mobile"])
def test_mobiletl_stores_less_than_ft_blocks(model_name):
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,))
    stored = {}
    for method in ("ft-blocks", "mobiletl"):
        torch.manual_seed(0)
        stored[method] = saved_activations(prepare(model_name, method, 3, num_classes=5).model, x, y).total_bytes
    assert stored["mobiletl"] < stored["ft-blocks"]


def test_frozen_bottom_keeps_no_activations():
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=5).model
    stored = saved_activations(model, torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2,)))
    bottom = [k for k, v in stored.per_module.items() if re.match(r"features\.[0-8](\.|$)", k) and v]
    assert bottom == []
    frozen = [m for m in model.features[:9].modules() if isinstance(m, FrozenLayer)]
    assert frozen and all(m.precision == "int8" and m.weight_int8.dtype == torch.int8 for m in frozen)


@pytest.mark.parametrize("model_name, method", [("mobilenet_v3_small", "mobiletl"), ("mobilenet_v2", "ft-blocks"),
                                                ("resnet18", "mobiletl"), ("mobilenet_v3_small", "ft-last")])
def test_optimized_bottom_computes_the_same_step(model_name, method):
    """Folded BNs and channels_last weights change how the bottom runs, not what the step computes."""
    blocks = None if method in GLOBAL_METHODS else 2
    torch.manual_seed(0)
    base = build_model(model_name, 5)
    _randomize_bn_statistics(base)
    # in float64, so that float32 rounding in the bottom is not amplified into the gradients
    plain = prepare(copy.deepcopy(base), method, blocks, num_classes=5, optimize_bottom=False).model.double()
    fast = prepare(copy.deepcopy(base), method, blocks, num_classes=5).model.double()
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.randint(0, 5, (2,))
    losses = {}
    for name, model in (("plain", plain), ("fast", fast)):
        torch.manual_seed(1)  # the same dropout mask
        losses[name] = F.cross_entropy(model(x), y)
        losses[name].backward()
    assert torch.allclose(losses["fast"], losses["plain"], rtol=1e-6)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and grads.keys() == {n for n, p in fast.named_parameters() if p.requires_grad}
    for n, p in fast.named_parameters():
        if p.requires_grad:
            # the folded scales are float32 products: 1e-7 relative, up to 1e-5 after 17 random blocks
            assert (p.grad - grads[n]).norm() <= 1e-4 * grads[n].norm() + 1e-12, n
    assert saved_activations(fast, x, y).total_bytes == saved_activations(plain, x, y).total_bytes


def _randomize_bn_statistics(model):
    """Pretrained-like BNs: folding a freshly initialised BN (mean 0, var 1, scale 1) tests little."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var.data = torch.rand(m.num_features, generator=g) + 0.5


def test_optimized_bottom_folds_its_bns_and_hands_on_a_contiguous_map():
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in build_model("mobilenet_v3_small").features[:9].modules())
    model = prepare("mobilenet_v3_small", "mobiletl", 3, num_classes=5).model
    bottom, top = model.features[:9], model.features[9:]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "ShiftOnlyBatchNorm2d"
                   for m in bottom.modules())
    convs = [m for m in bottom.modules() if isinstance(m, FrozenLayer)]
    assert sum(m.folded_batchnorm for m in convs) == bns > 0  # every BN, into the conv before it
    assert all(m.channels_last for m in convs)
    assert not any(isinstance(m, FrozenLayer) and m.folded_batchnorm for m in top.modules())
    seen = {}
    model.features[9].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model(torch.randn(2, 3, 64, 64))
    assert seen["x"].is_contiguous()
    assert "BN folded" in summary(model)


def test_float_option_keeps_float_weights():
    model = prepare("mobilenet_v3_small", "ft-blocks", 3, num_classes=5, frozen_precision="float").model
    frozen = [m for m in model.modules() if isinstance(m, FrozenLayer)]
    assert frozen and all(m.weight_float.dtype == torch.float32 for m in frozen)


def test_optimizer_holds_exactly_the_trainable_parameters():
    model, opt = prepare("mobilenet_v2", "mobiletl", 3, num_classes=5)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("kwargs, message", [
    (dict(model="mobilenet_v9", method="mobiletl", blocks=3), "mobilenet_v9"),
    (dict(model="mobilenet_v2", method="mobiletl-v2", blocks=3), "mobiletl-v2"),
    (dict(model="mobilenet_v2", method="mobiletl", blocks=0), "between 1 and 17"),
    (dict(model="mobilenet_v2", method="mobiletl", blocks=18), "between 1 and 17"),
    (dict(model="mobilenet_v2", method="mobiletl", blocks=None), "blocks"),
    (dict(model="mobilenet_v2", method="ft-all", blocks=3), "does not take blocks"),
    (dict(model="mobilenet_v2", method="remove-se", blocks=3), "squeeze-excitation"),
    (dict(model="resnet18", method="mobiletl-dw-bn", blocks=2), "inverted residual"),
    (dict(model="mobilenet_v2", method="mobiletl", blocks=3, frozen_precision="int4"), "int4"),
])
def test_bad_input_names_the_value_and_the_choices(kwargs, message):
    model = kwargs.pop("model")
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(model, **kwargs)


def test_unrecognised_model_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot recognise the blocks of Sequential"):
        prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "mobiletl", 1)


def test_block_counts():
    counts = {name: len(block_units(build_model(name, 10))) for name in MODEL_NAMES}
    assert counts == {"mobilenet_v2": 17, "mobilenet_v3_small": 11, "mobilenet_v3_large": 15,
                      "resnet18": 8, "resnet50": 16, "proxyless_mobile": 20}


def test_all_methods_listed():
    assert set(METHODS) == set(TRAINED) | {"tinytl-lite-residual", "mobiletl+tinytl-lite-residual"}
