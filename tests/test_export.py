"""Using a fine-tuned run: the plain inference model, TorchScript and ONNX export (checked by
onnxruntime), evaluation and prediction (mobiletl_edu.export)."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from mobiletl_edu import export as X
from mobiletl_edu import train as T
from mobiletl_edu.cli import main
from mobiletl_edu.methods import FoldedBatchNorm, prepare
from mobiletl_edu.models import build_model
from mobiletl_edu.ops import ShiftOnlyBatchNorm2d, SignHardswish, SignReLU, SignReLU6
from mobiletl_edu.quant import FrozenLayer

TRAINING_ONLY = (FrozenLayer, ShiftOnlyBatchNorm2d, SignHardswish, SignReLU6, SignReLU, FoldedBatchNorm)


def _pretrained_like(model_name, seed=0):
    """A model with live features and logits far from zero (a fresh MobileNet's are ~1e-10): BN
    statistics measured on random images, then scales and shifts drawn away from 1 and 0."""
    torch.manual_seed(seed)
    model = build_model(model_name, 5)
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the calibration batch
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64, generator=g))
    for m in bns:
        m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
        m.bias.data = torch.randn(m.num_features, generator=g) * 0.2
        m.momentum = 0.1
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5
    return model.eval()


@pytest.mark.parametrize("model_name, method", [
    ("mobilenet_v3_small", "mobiletl"), ("mobilenet_v3_small", "ft-bias"), ("mobilenet_v3_small", "ft-all"),
    ("mobilenet_v3_small", "tinytl-lite-residual"), ("mobilenet_v2", "mobiletl+tinytl-lite-residual"),
    ("mobilenet_v2", "ft-last"), ("resnet18", "mobiletl"), ("resnet18", "tinytl-lite-residual"),
])
def test_plain_model_computes_the_prepared_models_eval_logits(model_name, method):
    blocks = None if method.startswith("ft-") and method != "ft-blocks" else 2
    prepared = prepare(_pretrained_like(model_name), method, blocks, num_classes=5, resolution=64).model
    with torch.no_grad():  # a patch's last scale starts at zero: give the patches something to add
        for name, p in prepared.named_parameters():
            if ".patch." in name:
                p.add_(0.05 * torch.randn_like(p))
    prepared.eval()
    plain = X.plain_model(prepared)
    assert not any(isinstance(m, TRAINING_ONLY) for m in plain.modules())
    assert not plain.training and not any(p.requires_grad for p in plain.parameters())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, got = prepared(x), plain(x)
    assert expected.std(0).mean() > 0.05  # logits that depend on the image: worth comparing
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    if method != "ft-all":  # the prepared model itself is untouched
        assert any(isinstance(m, FrozenLayer) for m in prepared.modules())


def test_plain_model_has_the_torchvision_parameter_names():
    """A folded BN comes back as a BN: the state dict loads into torchvision's own network."""
    prepared = prepare(_pretrained_like("mobilenet_v3_small"), "mobiletl", 3, num_classes=5).model.eval()
    state = X.plain_model(prepared).state_dict()
    reference = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    reference.load_state_dict(state)  # strict: the same names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(reference(x), prepared(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    T.train(T.TrainConfig(weights="source", resolution=32, limit=16, epochs=1), out, progress=False)
    return out


def _eval_logits(run, x):
    model, _ = T.load_trained(run)
    with torch.no_grad():
        return model(x)


def _close(a, b):
    return np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_exported_torchscript_and_onnx_give_the_trained_logits(trained_run):
    import onnxruntime

    x = torch.randn(3, 3, 32, 32)  # another batch size than the export example: the batch axis is free
    expected = _eval_logits(trained_run, x)
    path = X.export_run(trained_run, "torchscript")
    meta = {"mobiletl.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=meta)
    assert _close(scripted(x), expected)
    assert json.loads(meta["mobiletl.json"])["classes"] == X.run_classes(trained_run)
    traced = torch.jit.trace(X.plain_model(T.load_trained(trained_run)[0]), x[:1])
    assert _close(traced(x), expected)

    path = X.export_run(trained_run, "onnx", trained_run / "m.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    assert _close(logits, expected)
    assert "Dress" in session.get_modelmeta().custom_metadata_map["mobiletl"]

    path = X.export_run(trained_run, "state-dict")
    plain = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    plain.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert _close(plain(x), expected)


def test_export_never_overwrites_and_leaves_no_partial_file(trained_run, monkeypatch):
    target = trained_run / "kept.onnx"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="already exists"):
        X.export_run(trained_run, "onnx", target)
    assert target.read_bytes() == b"mine"

    def broken(*args, **kwargs):
        with open(args[2], "wb") as half:
            half.write(b"half an onnx file")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(X, "_export_onnx", broken)
    before = sorted(os.listdir(trained_run))
    with pytest.raises(RuntimeError, match="exporter crashed"):
        X.export_run(trained_run, "onnx", trained_run / "new.onnx")
    assert sorted(os.listdir(trained_run)) == before


def _image(path, seed, size=40):
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)


def test_predict_names_the_classes_and_matches_the_model(trained_run, tmp_path):
    for i, suffix in enumerate(("a.png", "b.jpg")):
        _image(tmp_path / suffix, i)
    results = X.predict(trained_run, [tmp_path], top=2)
    classes = X.run_classes(trained_run)
    assert classes == ["Dress", "Coat", "Shirt", "Sneaker", "Ankle boot"]
    assert [r["file"] for r in results] == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    model, config = T.load_trained(trained_run)
    from mobiletl_edu.data import test_transform
    x = test_transform(config.resolution)(Image.open(tmp_path / "a.png").convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probabilities = model(x).softmax(1)[0]
    best = probabilities.argmax().item()
    assert results[0]["top"][0]["class"] == classes[best]
    assert results[0]["top"][0]["probability"] == pytest.approx(probabilities[best].item(), rel=1e-5)
    assert len(results[0]["top"]) == 2


def test_cli_evaluate_predict_and_export(trained_run, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(trained_run), "--out", str(out)]) == 0
    assert "Ankle boot" in capsys.readouterr().out
    report = json.loads((out / "evaluation.json").read_text())
    summary = json.loads((trained_run / "summary.json").read_text())
    assert report["top1"] == pytest.approx(summary["final"]["test_top1"])
    assert report["images"] == 16 and sum(map(sum, report["confusion"])) == 16
    assert set(report["per_class_top1"]) == set(X.run_classes(trained_run))
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(trained_run), "--out", str(out)]) == 2  # never over an earlier one
    assert "already exists" in capsys.readouterr().err

    _image(tmp_path / "shirt.png", 3)
    assert main(["predict", str(trained_run), str(tmp_path / "shirt.png"), "--top", "1", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["top"][0]["class"] in X.run_classes(trained_run)

    assert main(["export", str(trained_run), "--format", "torchscript", "--out", str(tmp_path / "no" / "m.pt")]) == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and len(error.strip().splitlines()) == 1
