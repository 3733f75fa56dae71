"""Training runs, checkpoints, resume, weights and the shipped source checkpoint (mobiletl_edu.train)."""
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from mobiletl_edu import train as T
from mobiletl_edu.cli import main
from mobiletl_edu.data import build_datasets
from mobiletl_edu.models import build_model
from mobiletl_edu.pretrain import pretrain, pretrain_config, verify_source_checkpoint

# 24 images a split at 32x32, batch 8: three optimizer steps an epoch.
TINY = dict(weights="source", resolution=32, limit=24, epochs=3)
STEPS_PER_EPOCH = 3
NONDETERMINISTIC = {"epoch_time_s", "peak_memory_bytes"}


def files_digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def assert_bitwise_equal(a, b, where="checkpoint"):
    """Tensors equal bit for bit (same dtype, same values), containers recursively; times skipped."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key not in NONDETERMINISTIC:
                assert_bitwise_equal(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# Subprocesses get one torch thread, like this process (conftest.py): results then match bit for
# bit across processes, and a busy 2-core machine does not stall on OpenMP spin-waits.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    summary = T.train(T.TrainConfig(**TINY), out, progress=False)
    return out, summary


class StepHook:
    """A global optimizer step hook (torch.optim's own API) that calls ``action`` at step ``n``."""

    def __init__(self, n, action):
        self.count, self.n, self.action = 0, n, action

    def __enter__(self):
        def hook(optimizer, args, kwargs):
            self.count += 1
            if self.count == self.n:
                self.action(optimizer)
        self.handle = register_optimizer_step_post_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# Defaults and outputs
# ---------------------------------------------------------------------------------------------
def test_defaults_are_the_offline_demo():
    config = T.TrainConfig().resolved()
    assert (config.model, config.method, config.blocks, config.dataset, config.weights) == (
        "mobilenet_v3_small", "mobiletl", 3, "offline-target", "source")
    assert (config.batch_size, config.epochs, config.resolution) == (8, T.OFFLINE_EPOCHS, T.OFFLINE_RESOLUTION)
    paper = T.TrainConfig(dataset="cifar100", method="ft-all").resolved()
    assert (paper.epochs, paper.resolution, paper.lr, paper.label_smoothing, paper.weights, paper.blocks) == (
        50, 224, 3e-4, 0.1, "imagenet", None)


def test_cli_without_flags_runs_the_offline_default(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_fit(config, out, checkpoint, **where):
        seen.update(config=config, out=out)
        return {"config": vars(config), "final": {"test_top1": 1.0}, "epochs_done": 0,
                "trainable_parameters": 1, "stored_activation_bytes": 0, "out": str(out)}

    monkeypatch.setattr(T, "_fit", fake_fit)
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    assert seen["config"] == T.TrainConfig().resolved()
    assert seen["out"].parts[0] == "runs"


def test_a_run_writes_metrics_checkpoint_and_summary(finished_run):
    out, summary = finished_run
    assert {"config.json", "checkpoint.pt", "metrics.json", "metrics.csv", "summary.json"} <= set(os.listdir(out))
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(row) == {"epoch", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "epoch_time_s",
                            "stored_activation_bytes", "peak_memory_bytes"}
        assert row["stored_activation_bytes"] > 0 and row["peak_memory_bytes"] > 0 and 0 <= row["test_top1"] <= 100
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in table] == [r["train_loss"] for r in rows]
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine annealed to zero at the last step
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 3 and len(checkpoint["data_order"]) == 3
    assert {"torch", "python", "numpy"} <= set(checkpoint["rng"])
    assert summary["final"] == rows[-1] and summary["epochs_done"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["weights_sha256"] == T.file_sha256(T.SOURCE_CHECKPOINT)


def test_load_trained_gives_back_the_evaluated_model(finished_run):
    out, summary = finished_run
    model, config = T.load_trained(out)
    _, test_ds, num_classes = build_datasets(config.dataset, "data", config.resolution)
    test_ds = T._fixed_subset(test_ds, config.limit)
    assert T.evaluate(model, test_ds)["top1"] == summary["final"]["test_top1"]
    with pytest.raises(ValueError, match="trained for 5 classes, not 7"):
        T.load_trained(out, num_classes=7)


# ---------------------------------------------------------------------------------------------
# Resume: killed mid-epoch, resumed, bit for bit the uninterrupted run
# ---------------------------------------------------------------------------------------------
KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from mobiletl_edu.train import TrainConfig, train
    count = [0]
    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    register_optimizer_step_post_hook(hook)
    train(TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], progress=False)
""")


def test_resume_after_a_kill_ends_bit_for_bit_where_an_uninterrupted_run_does(finished_run, tmp_path):
    reference, _ = finished_run
    out = tmp_path / "killed"
    kill_at = STEPS_PER_EPOCH + 2  # the second step of epoch 2
    result = subprocess.run([sys.executable, "-c", KILLED_RUN, json.dumps(TINY), str(out), str(kill_at)],
                            capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (out / "summary.json").exists()

    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    expected = torch.load(reference / "checkpoint.pt", weights_only=True)
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(expected) >= {"model", "optimizer", "scheduler", "rng", "data_order", "metrics"}
    assert_bitwise_equal(expected, resumed)


def test_resume_refuses_other_settings_and_a_missing_run(finished_run, tmp_path):
    out, _ = finished_run
    with pytest.raises(ValueError, match=r"cannot resume .* epochs=5 \(the run has 3\)"):
        T.resume(out, {"epochs": 5})
    with pytest.raises(FileNotFoundError, match="holds no run"):
        T.resume(tmp_path / "nothing")


def test_resuming_a_finished_run_changes_nothing(finished_run):
    out, summary = finished_run
    before = files_digest(out)
    again = T.resume(out, progress=False)
    assert again["final"] == summary["final"]
    after = files_digest(out)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------
# Failures: NaN loss, an occupied output directory, bad input
# ---------------------------------------------------------------------------------------------
def _poison(optimizer):
    with torch.no_grad():
        optimizer.param_groups[0]["params"][0].fill_(float("nan"))


@pytest.mark.parametrize("step, caught", [(STEPS_PER_EPOCH + 1, "training loss became nan"),
                                          (2 * STEPS_PER_EPOCH, "weights became NaN")])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys, step, caught):
    out = tmp_path / "nan"
    with StepHook(step, _poison):
        status = main(["train", "--out", str(out), "--quiet", "--weights", "source", "--resolution", "32",
                       "--limit", "24", "--epochs", "3"])
    assert status == 2
    error = capsys.readouterr().err
    assert caught in error and "last good checkpoint (epoch 1)" in error and "Traceback" not in error
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values() if v.is_floating_point())
    assert len(json.loads((out / "metrics.json").read_text())) == 1


def test_an_output_directory_holding_a_run_is_refused_and_left_alone(finished_run, capsys):
    out, _ = finished_run
    before = files_digest(out)
    with pytest.raises(FileExistsError, match="holds another run"):
        T.train(T.TrainConfig(**TINY), out, progress=False)
    assert main(["train", "--out", str(out), "--method", "ft-last"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert files_digest(out) == before


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(T.os, "replace", crash)
    with pytest.raises(OSError):
        T.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "unknown dataset 'nope'; valid choices:"),
    (["--dataset", "cifar10", "--weights", "none"], "not found: looked for data/cifar-10-batches-py. Pass --download"),
    (["--weights", "missing.pt"], "neither one of imagenet, source, none nor an existing checkpoint"),
    (["--method", "ft-all", "--blocks", "2"], "does not take blocks"),
    (["--epochs", "0"], "epochs must be a positive integer"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out", "out", "--data-root", "data", "--quiet", *args]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_errors_have_no_traceback(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", "train", "--weights", str(bad),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert result.returncode == 2
    assert "is not a readable PyTorch checkpoint" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def test_source_weights_load_and_get_a_new_classifier():
    state = torch.load(T.SOURCE_CHECKPOINT, weights_only=True)
    torch.manual_seed(0)
    model = T.load_weights("mobilenet_v3_small", "source", 5)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("classifier.3."))
    assert not torch.equal(loaded["classifier.3.weight"], state["classifier.3.weight"])  # a new head
    kept = T.load_weights("mobilenet_v3_small", "source", 5, new_classifier=False)
    assert torch.equal(kept.state_dict()["classifier.3.weight"], state["classifier.3.weight"])


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the torch hub cache .* --download"):
        T.load_weights("mobilenet_v3_small", "imagenet", 10)
    _, path = T.imagenet_weights_file("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    imagenet = build_model("mobilenet_v3_small", 1000).state_dict()
    torch.save(imagenet, path)
    model = T.load_weights("mobilenet_v3_small", "imagenet", 10)
    assert torch.equal(model.state_dict()["features.0.0.weight"], imagenet["features.0.0.weight"])
    assert model.classifier[3].out_features == 10
    with pytest.raises(ValueError, match="no ImageNet weights for proxyless_mobile"):
        T.load_weights("proxyless_mobile", "imagenet", 10)


def test_checkpoints_that_do_not_fit_are_clear_errors(tmp_path):
    other_model = tmp_path / "resnet18.pt"
    torch.save(build_model("resnet18", 10).state_dict(), other_model)
    with pytest.raises(ValueError, match="does not fit mobilenet_v3_small: it has no classifier weight"):
        T.load_weights("mobilenet_v3_small", str(other_model), 5)

    reshaped = build_model("mobilenet_v3_small", 5).state_dict()
    reshaped["features.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(reshaped, tmp_path / "reshaped.pt")
    with pytest.raises(ValueError, match=r"1 of another shape \(checkpoint vs model: features.0.0.weight"):
        T.load_weights("mobilenet_v3_small", str(tmp_path / "reshaped.pt"), 5)

    with pytest.raises(ValueError, match="has a 5-class classifier; the model needs 10 classes"):
        T.load_weights("mobilenet_v3_small", "source", 10, new_classifier=False)

    (tmp_path / "truncated.pt").write_bytes(T.SOURCE_CHECKPOINT.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        T.load_weights("mobilenet_v3_small", str(tmp_path / "truncated.pt"), 5)

    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")  # refused by weights_only
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        T.load_weights("mobilenet_v3_small", str(tmp_path / "pickled_module.pt"), 5)


def test_a_prepared_run_checkpoint_is_not_plain_weights(finished_run):
    out, _ = finished_run
    with pytest.raises(ValueError, match="training checkpoint of a 'mobiletl' run"):
        T.load_weights("mobilenet_v3_small", str(out / "checkpoint.pt"), 5)


# ---------------------------------------------------------------------------------------------
# The shipped source checkpoint and the pretraining command
# ---------------------------------------------------------------------------------------------
def test_the_shipped_source_checkpoint_matches_its_provenance():
    record = verify_source_checkpoint()
    assert T.SOURCE_CHECKPOINT.stat().st_size < 10 * 2**20
    assert record["command"].startswith("mobiletl-edu pretrain ")
    assert record["config"]["dataset"] == "offline-source" and record["config"]["weights"] == "none"
    assert {"seed", "data", "sha256", "torch"} <= set(record)


def test_pretraining_is_reproducible_and_never_overwrites(tmp_path):
    config = pretrain_config(epochs=1, limit=16, resolution=32, batch_size=8)
    first = pretrain(tmp_path / "a.pt", config, work_dir=tmp_path / "a-run", progress=False)
    second = pretrain(tmp_path / "b.pt", config, work_dir=tmp_path / "b-run", progress=False)
    assert first["sha256"] == second["sha256"] == T.file_sha256(tmp_path / "a.pt")
    assert "--epochs 1" in first["command"] and "--limit 16" in first["command"]
    with pytest.raises(FileExistsError):
        pretrain(tmp_path / "a.pt", config, progress=False)
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(state) == set(build_model("mobilenet_v3_small", 5).state_dict())


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------
def test_one_run_on_two_processes_with_torchrun(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "mobiletl_edu.cli", "train", "--out", str(out), "--quiet", "--weights", "source",
               "--resolution", "32", "--limit", "16", "--epochs", "1", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["processes"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and 0 <= summary["final"]["test_top1"] <= 100
    assert result.stdout.count("test top-1") == 1  # only rank 0 reports
