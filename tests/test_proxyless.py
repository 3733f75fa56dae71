"""Tests for ProxylessNAS-Mobile and its checkpoint loader."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.mobilenetv3 import InvertedResidual

from mobiletl_edu.proxyless import (
    BN_EPS,
    PROXYLESS_MOBILE_BLOCKS,
    STEM_CHANNELS,
    load_proxyless_checkpoint,
    official_key_map,
    proxyless_mobile,
)

# MobileTL (AAAI 2023) Table 3, Proxyless-Mobile on CIFAR-100.
PAPER_FT_ALL_PARAMS_100_CLASSES = 2_927_612
PAPER_FT_LAST_PARAMS_100_CLASSES = 128_100
# Published ImageNet size of ProxylessNAS-Mobile (osmr/imgclsmob asserts this exact count).
IMAGENET_PARAMS = 4_080_512


def _param_count(model):
    return sum(p.numel() for p in model.parameters())


def _randomise_batch_norm_statistics(model, seed=0):
    """Give every BN non-trivial running statistics so that eval outputs depend on them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)
            module.num_batches_tracked.fill_(7)


def _to_official_layout(state_dict):
    ours_to_official = {ours: official for official, ours in official_key_map().items()}
    return {ours_to_official[key]: value.clone() for key, value in state_dict.items()}


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    model = proxyless_mobile(num_classes=100)
    _randomise_batch_norm_statistics(model)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def source_logits(source_model, images):
    with torch.no_grad():
        return source_model(images)


def test_parameter_count_matches_mobiletl_table_3():
    model = proxyless_mobile(num_classes=100)
    assert _param_count(model) == PAPER_FT_ALL_PARAMS_100_CLASSES
    assert _param_count(model.classifier) == PAPER_FT_LAST_PARAMS_100_CLASSES


def test_parameter_count_imagenet():
    assert _param_count(proxyless_mobile()) == IMAGENET_PARAMS


@pytest.mark.parametrize("resolution", [224, 64])
def test_forward_shape(resolution):
    model = proxyless_mobile(num_classes=10).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, resolution, resolution))
    assert logits.shape == (1, 10)


def test_module_layout():
    model = proxyless_mobile(num_classes=100)
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    real_rows = [row for row in PROXYLESS_MOBILE_BLOCKS if not row.is_zero]
    assert len(PROXYLESS_MOBILE_BLOCKS) == 22
    assert len(blocks) == len(real_rows) == 20
    assert len(model.features) == len(real_rows) + 2
    assert [b.out_channels for b in blocks] == [row.out_channels for row in real_rows]
    # Shortcut exactly where stride is 1 and the width is unchanged.
    assert sum(b.use_res_connect for b in blocks) == 13
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.Hardswish)) for m in model.modules())
    assert all(m.eps == BN_EPS for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.features[0][0].out_channels == STEM_CHANNELS
    assert model.features[-1][0].out_channels == 1280


def test_key_map_covers_every_tensor_once():
    key_map = official_key_map()
    ours = set(proxyless_mobile().state_dict())
    assert set(key_map.values()) == ours
    assert len(key_map) == len(ours)
    assert "blocks.0.mobile_inverted_conv.depth_conv.conv.weight" in key_map
    assert "blocks.1.mobile_inverted_conv.inverted_bottleneck.conv.weight" in key_map
    assert not any(key.startswith(("blocks.3.", "blocks.4.")) for key in key_map)


def _official_reference_forward(state, x):
    """ProxylessNAS-Mobile evaluated straight from official keys with torch.nn.functional."""

    def conv_bn(prefix, x, stride=1, groups=1, relu6=True):
        weight = state[f"{prefix}.conv.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups)
        x = F.batch_norm(
            x, state[f"{prefix}.bn.running_mean"], state[f"{prefix}.bn.running_var"],
            state[f"{prefix}.bn.weight"], state[f"{prefix}.bn.bias"], training=False, eps=BN_EPS,
        )
        return F.relu6(x) if relu6 else x

    x = conv_bn("first_conv", x, stride=2)
    for index, row in enumerate(PROXYLESS_MOBILE_BLOCKS):
        if row.is_zero:
            continue
        prefix = f"blocks.{index}.mobile_inverted_conv"
        y = x
        if row.expand_ratio > 1:
            y = conv_bn(f"{prefix}.inverted_bottleneck", y)
        y = conv_bn(f"{prefix}.depth_conv", y, stride=row.stride, groups=y.shape[1])
        y = conv_bn(f"{prefix}.point_linear", y, relu6=False)
        x = x + y if row.stride == 1 and x.shape[1] == y.shape[1] else y
    x = conv_bn("feature_mix_layer", x)
    x = x.mean(dim=(2, 3))
    return F.linear(x, state["classifier.linear.weight"], state["classifier.linear.bias"])


def test_official_layout_round_trip_is_bitwise(source_model, source_logits, images, tmp_path):
    official = _to_official_layout(source_model.state_dict())
    path = tmp_path / "proxyless_mobile_official.pth"
    torch.save({"state_dict": official, "epoch": 3}, path)

    model = proxyless_mobile(num_classes=100)
    load_proxyless_checkpoint(model, path)
    model.eval()
    with torch.no_grad():
        logits = model(images)
        # The key table also agrees with the original network's semantics.
        reference = _official_reference_forward(official, images)
    assert torch.equal(logits, source_logits)
    assert torch.allclose(logits, reference, atol=1e-5, rtol=1e-4)
    assert model.features[1].block[0][1].num_batches_tracked.item() == 7


def test_once_for_all_alias_and_missing_batch_counters(source_model, source_logits, images, tmp_path):
    official = _to_official_layout(source_model.state_dict())
    ofa_style = {
        key.replace(".mobile_inverted_conv.", ".conv."): value
        for key, value in official.items()
        if not key.endswith("num_batches_tracked")
    }
    path = tmp_path / "ofa_style.pth"
    torch.save(ofa_style, path)

    model = proxyless_mobile(num_classes=100)
    load_proxyless_checkpoint(model, path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), source_logits)


def test_own_state_dict_round_trip(source_model, source_logits, images, tmp_path):
    path = tmp_path / "ours.pth"
    torch.save(source_model.state_dict(), path)
    model = proxyless_mobile(num_classes=100)
    load_proxyless_checkpoint(model, path)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), source_logits)


def test_class_count_mismatch_names_the_key(source_model, tmp_path):
    path = tmp_path / "hundred_classes.pth"
    torch.save({"state_dict": _to_official_layout(source_model.state_dict())}, path)
    with pytest.raises(ValueError, match=r"classifier\.linear\.weight.*\(100, 1280\).*\(10, 1280\)"):
        load_proxyless_checkpoint(proxyless_mobile(num_classes=10), path)


def test_garbage_file_is_rejected_with_its_path(tmp_path):
    path = tmp_path / "not_a_checkpoint.pth"
    path.write_bytes(b"definitely not a pickle or a zip archive")
    with pytest.raises(ValueError, match="not_a_checkpoint.pth"):
        load_proxyless_checkpoint(proxyless_mobile(num_classes=10), path)


def test_missing_keys_rejected_when_strict(source_model, tmp_path):
    state = source_model.state_dict()
    state.pop("features.5.block.1.0.weight")
    path = tmp_path / "incomplete.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"features\.5\.block\.1\.0\.weight"):
        load_proxyless_checkpoint(proxyless_mobile(num_classes=100), path)
    result = load_proxyless_checkpoint(proxyless_mobile(num_classes=100), path, strict=False)
    assert result.missing_keys == ["features.5.block.1.0.weight"]
