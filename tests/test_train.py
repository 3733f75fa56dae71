"""Training runs, checkpoints, resume, weights and the shipped source checkpoint (mobiletl_edu.train)."""
import csv
import hashlib
import json
import math
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

    def fake_fit(config, out, checkpoint, where, resuming=False):
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
    with pytest.raises(ValueError, match=r"cannot resume .* lr=0.5 \(the run has 0.002\)"):
        T.resume(out, {"lr": 0.5, "epochs": 5})
    with pytest.raises(ValueError, match=r"epochs=2: the run has 3; --epochs can only grow"):
        T.resume(out, {"epochs": 2})
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
    (["--dataset", "nope"], "invalid choice: 'nope' (choose from 'cifar10'"),
    (["--dataset", "cifar10", "--weights", "none"], "not found: looked for data/cifar-10-batches-py. Pass --download"),
    (["--weights", "missing.pt"], "neither one of imagenet, source, none nor an existing checkpoint"),
    (["--method", "ft-all", "--blocks", "2"], "does not take blocks"),
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
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
    with pytest.raises(ValueError, match="refused to load .* could run code") as refused:
        T.load_weights("mobilenet_v3_small", str(tmp_path / "pickled_module.pt"), 5)
    assert "weights_only=False" not in str(refused.value)  # torch's advice is not passed on


def test_a_fine_tuned_run_serves_as_weights_for_another(finished_run):
    """--weights RUN: the run's model, turned back into a plain network (export.plain_model)."""
    out, _ = finished_run
    trained, _ = T.load_trained(out)
    for given in (out, out / "checkpoint.pt"):
        model = T.load_weights("mobilenet_v3_small", str(given), 5, new_classifier=False).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(model(x), trained(x), rtol=1e-4, atol=1e-5)


def test_a_proxyless_run_serves_as_weights_and_official_files_still_load(tmp_path):
    """ProxylessNAS-Mobile takes both key layouts: a run of ours (Figure 5's source checkpoints)
    and the official release's names (checked against a save in that layout)."""
    from mobiletl_edu.proxyless import official_key_map

    out = tmp_path / "proxyless"
    T.train(T.TrainConfig(model="proxyless_mobile", method="ft-all", dataset="offline-source",
                          weights="none", resolution=32, limit=8, epochs=1), out, progress=False)
    trained, _ = T.load_trained(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = trained.eval()(x)
        model = T.load_weights("proxyless_mobile", str(out), 5, new_classifier=False).eval()
        assert torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
        ours_to_official = {ours: official for official, ours in official_key_map().items()}
        state = model.state_dict()
        torch.save({ours_to_official[k]: v for k, v in state.items()}, tmp_path / "official.pth")
        official = T.load_weights("proxyless_mobile", str(tmp_path / "official.pth"), 5,
                                  new_classifier=False).eval()
        assert torch.equal(official(x), model(x))


def test_training_from_a_run_folder_records_its_checkpoints_sha256(finished_run, tmp_path):
    """A run folder as --weights: the new run's provenance is the sha256 of its checkpoint file."""
    out, _ = finished_run
    again = tmp_path / "again"
    assert main(["train", "--out", str(again), "--quiet", "--weights", str(out), "--resolution", "32",
                 "--limit", "16", "--epochs", "1", "--threads", "1"]) == 0
    recorded = json.loads((again / "config.json").read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((out / "checkpoint.pt").read_bytes()).hexdigest()


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


# ---------------------------------------------------------------------------------------------
# Seeds: every method's head, data order and augmentation follow the seed
# ---------------------------------------------------------------------------------------------
def _one_epoch_of_one_step(method, seed):
    """The first epoch of a run (one optimizer step on 8 images), through the training code itself."""
    config = T.TrainConfig(method=method, seed=seed, weights="source", resolution=32, limit=8, epochs=1).resolved()
    train_ds, test_ds, _ = build_datasets(config.dataset, "data", config.resolution)
    train_ds, test_ds = T._fixed_subset(train_ds, 8), T._fixed_subset(test_ds, 8)
    model, optimizer = T._prepared_model(config, 5, config.weights)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=1)
    _, order = T._train_epoch(model, model, optimizer, scheduler, nn.CrossEntropyLoss(), train_ds, test_ds, config,
                              0, T.Processes(), False, None, [])
    return initial, model.state_dict(), order


@pytest.mark.parametrize("method", T.METHODS)
def test_two_seeds_give_different_heads_data_order_and_weights_after_one_step(method):
    init0, after0, order0 = _one_epoch_of_one_step(method, 0)
    init1, after1, order1 = _one_epoch_of_one_step(method, 1)
    head = [k for k in init0 if k.startswith("classifier.3.")]
    assert head and all(not torch.equal(init0[k], init1[k]) for k in head)  # the new classifier
    assert order0 != order1  # the data order
    trained = [k for k in after0 if not torch.equal(after0[k], init0[k]) and not k.endswith("num_batches_tracked")]
    assert trained and all(not torch.equal(after0[k], after1[k]) for k in trained)


def test_the_seed_changes_the_augmentation():
    train_ds, _, _ = build_datasets("offline-target", "data", 32)
    crops = []
    for seed in (0, 1):
        T.seed_everything(T.epoch_seed(seed, 0, "rank0"))  # what each epoch of a run does first
        crops.append(train_ds[0][0])
    assert not torch.equal(*crops)


# ---------------------------------------------------------------------------------------------
# Continuing a finished run; runs that fail early leave nothing; Ctrl-C says how to resume
# ---------------------------------------------------------------------------------------------
def test_a_finished_run_continues_for_more_epochs(tmp_path):
    out = tmp_path / "short"
    config = dict(TINY, epochs=1)
    T.train(T.TrainConfig(**config), out, progress=False)
    assert main(["train", "--resume", "--out", str(out), "--epochs", "2", "--quiet"]) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    # the schedule is stretched to the new length: after the last step the rate is the cosine's end, 0,
    # and continuing to 3 epochs (9 steps) the first new step runs at lr0 * (1 + cos(pi * 6/9)) / 2
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    lrs = []
    with StepHook(1, lambda optimizer: lrs.append(optimizer.param_groups[0]["lr"])):
        main(["train", "--resume", "--out", str(out), "--epochs", "3", "--quiet"])
    lr0 = json.loads((out / "config.json").read_text())["config"]["lr"]
    assert lrs[0] == pytest.approx(lr0 * (1 + math.cos(math.pi * 6 / 9)) / 2, rel=1e-9)
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["epochs"] == 3 and record["continued"][-1] == {"from_epochs": 2, "to_epochs": 3}


def _interrupt(optimizer):
    raise KeyboardInterrupt


def test_ctrl_c_prints_the_run_folder_and_the_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--weights", "source", "--resolution", "32", "--limit", "24", "--epochs", "2", "--quiet"]
    with StepHook(STEPS_PER_EPOCH + 1, _interrupt):
        assert main(["train", "--out", "run", *flags]) == 130
    error = capsys.readouterr().err.strip()
    assert error.endswith("Continue it with: mobiletl-edu train --resume --out run")
    assert main(["train", "--resume", "--out", "run", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_done"] == 2

    with StepHook(2, _interrupt):  # before the first epoch ends: nothing is kept
        assert main(["train", *flags]) == 130
    assert "nothing was kept" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no runs/ folder was left behind


def test_a_run_that_diverges_in_its_first_epoch_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "nan"
    with StepHook(1, _poison):
        assert main(["train", "--out", str(out), "--quiet", "--weights", "source", "--resolution", "32",
                     "--limit", "24", "--epochs", "2"]) == 2
    assert "no checkpoint was written" in capsys.readouterr().err
    assert not out.exists()


def test_your_own_dataset_object_trains(tmp_path):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 3
    data = torch.utils.data.TensorDataset(images, labels)
    summary = T.train(T.TrainConfig(dataset="custom", weights="source", epochs=1, resolution=32), tmp_path / "own",
                      data=(data, data), classes=["red", "green", "blue"], progress=False)
    assert summary["classes"] == ["red", "green", "blue"] and summary["num_classes"] == 3
    with pytest.raises(ValueError, match="together with dataset='custom'"):
        T.train(T.TrainConfig(weights="source"), tmp_path / "x", data=(data, data))


def test_a_modified_source_checkpoint_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / T.SOURCE_CHECKPOINT.name
    data = bytearray(T.SOURCE_CHECKPOINT.read_bytes())
    data[-100] ^= 0xFF
    copy.write_bytes(bytes(data))
    (tmp_path / T.SOURCE_CHECKPOINT.with_suffix(".json").name).write_bytes(
        T.SOURCE_CHECKPOINT.with_suffix(".json").read_bytes())
    monkeypatch.setattr(T, "SOURCE_CHECKPOINT", copy)
    with pytest.raises(ValueError, match="has been modified: its sha256 is"):
        T.load_weights("mobilenet_v3_small", "source", 5)


def test_without_a_terminal_each_epoch_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mobiletl_edu.cli", "train", "--out", str(tmp_path / "log"),
                             "--weights", "source", "--resolution", "32", "--limit", "16", "--epochs", "2"],
                            capture_output=True, text=True, env=ONE_THREAD_ENV)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "it/s" not in result.stderr  # no progress bar redraws
    assert [line.split(":")[0] for line in result.stderr.splitlines()] == ["epoch 1/2", "epoch 2/2"]
