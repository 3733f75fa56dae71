"""Block discovery: stem, blocks, fusion layers and classifier of each supported model."""
import pytest
from torch import nn

from mobiletl_edu.models import build_model, find_units, norm_roles


def roles(model):
    return [(u.path, u.role) for u in find_units(model)]


def test_mobilenet_v2_units():
    units = roles(build_model("mobilenet_v2", 10))
    assert units[0] == ("features.0", "stem")
    assert [p for p, r in units if r == "block"] == [f"features.{i}" for i in range(1, 18)]
    assert [p for p, r in units if r == "fusion"] == ["features.18"]
    assert [p for p, r in units if r == "classifier"] == ["classifier.1"]


def test_mobilenet_v3_small_fusion_includes_the_576_to_1024_linear():
    units = roles(build_model("mobilenet_v3_small", 10))
    assert [p for p, r in units if r == "fusion"] == ["features.12", "classifier.0"]
    assert [p for p, r in units if r == "classifier"] == ["classifier.3"]


@pytest.mark.parametrize("model_name", ["mobilenet_v3_small", "resnet18"])
@pytest.mark.parametrize("method", ["ft-last", "tinytl-lite-residual"])
def test_units_keep_their_roles_once_prepared(model_name, method):
    """A frozen fusion Linear is still a fusion layer, a patched block still a block."""
    from mobiletl_edu.methods import prepare
    blocks = None if method == "ft-last" else 2
    before = roles(build_model(model_name, 10))
    assert roles(prepare(model_name, method, blocks, num_classes=10).model) == before


def test_resnet_units():
    units = roles(build_model("resnet50", 10))
    assert [p for p, r in units if r == "stem"] == ["conv1", "bn1", "relu", "maxpool"]
    assert len([p for p, r in units if r == "block"]) == 16
    assert units[-1] == ("fc", "classifier")


@pytest.mark.parametrize("name, index, expected", [
    ("mobilenet_v2", 1, {"conv.0.1": "depthwise", "conv.2": "project"}),  # expansion 1: no expand conv
    ("mobilenet_v2", 5, {"conv.0.1": "expand", "conv.1.1": "depthwise", "conv.3": "project"}),
    ("mobilenet_v3_small", 4, {"block.0.1": "expand", "block.1.1": "depthwise", "block.3.1": "project"}),
])
def test_norm_roles_of_inverted_residuals(name, index, expected):
    model = build_model(name, 10)
    assert norm_roles(model.features[index]) == expected


def test_norm_roles_of_resnet_blocks():
    r18, r50 = build_model("resnet18", 10), build_model("resnet50", 10)
    assert norm_roles(r18.layer2[0]) == {"bn1": "intermediate", "bn2": "last", "downsample.1": "shortcut"}
    assert norm_roles(r50.layer1[1]) == {"bn1": "intermediate", "bn2": "intermediate", "bn3": "last"}


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg16'.*mobilenet_v2"):
        build_model("vgg16")


class PlainNet(nn.Module):
    """features + classifier like a MobileNet, but plain convolutions: no blocks to find."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.classifier = nn.Linear(8, 2)


def test_model_without_recognisable_blocks():
    with pytest.raises(ValueError, match="cannot recognise the blocks of PlainNet.*mobilenet_v2"):
        find_units(PlainNet())
