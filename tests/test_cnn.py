"""Tests of cnn_project.py: architectures, data pipeline, the training grid, results and report.

Tests that need the real MNIST in ../shared/data skip when it is absent; CIFAR-10 is tested on a small
fixture in torchvision's format; nothing here touches the network.
"""

import csv
import math
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnn_project as cp

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                 reason="real MNIST not found in ../shared/data")

RECORD_KEYS = {"format", "model", "model_display_name", "dataset", "status", "failure_reason",
               "history", "best_epoch", "best_val_accuracy", "params", "train_time_s",
               "throughput_img_s", "target_val_accuracy", "time_to_target_s", "test", "classes",
               "wall_time_s", "config", "versions"}
HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                "epoch_time_s"}
TEST_KEYS = {"loss", "accuracy", "precision", "recall", "f1", "n_images", "confusion_matrix"}


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Make every torchvision download fail at once, as it does offline."""
    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    for name in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(getattr(torchvision.datasets, name), "download", offline)


def assert_plain(obj, where="record"):
    """Pickled results hold only plain Python types and NumPy arrays."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str), f"{where}: key {k!r}"
            assert_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (bool, int, float, str, np.ndarray)), \
            f"{where} is a {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(cp.MODELS_REGISTRY))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_forward_backward_shapes(name, channels, size):
    torch.manual_seed(0)
    width = 1.0 if name == "lenet5" else 0.125
    model = cp.build_model(name, channels, 10, width, size)
    x = torch.randn(3, channels, size, size)
    logits = model(x)
    assert logits.shape == (3, 10)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_width_multiplier_scales_parameters():
    small = sum(p.numel() for p in cp.build_model("resnet", 3, 10, 0.25, 32).parameters())
    full = sum(p.numel() for p in cp.build_model("resnet", 3, 10, 1.0, 32).parameters())
    assert 10 * small < full  # conv weights scale with width squared
    assert 10e6 < full < 12e6  # ResNet-18 for CIFAR has 11.2M parameters


def test_lenet5_pool_then_relu_is_relu_then_pool():
    """LeNet-5 pools before its ReLU (the paper's order, and cheaper); values and gradients must
    match the usual ReLU-then-pool ordering exactly."""
    torch.manual_seed(0)
    model = cp.build_model("lenet5", 1, 10, 1.0, 28)
    conv1, conv3 = model.features[0], model.features[3]
    x = torch.randn(4, 1, 28, 28)

    def relu_then_pool(t):
        t = F.max_pool2d(F.relu(conv1(t)), 2)
        return model.classifier(F.max_pool2d(F.relu(conv3(t)), 2))

    ours, reference = model(x), relu_then_pool(x)
    assert torch.equal(ours, reference)
    g_ours = torch.autograd.grad(ours.sum(), conv1.weight)[0]
    g_ref = torch.autograd.grad(reference.sum(), conv1.weight)[0]
    assert torch.equal(g_ours, g_ref) and g_ours.abs().sum() > 0


def test_unknown_model_raises_with_known_names():
    with pytest.raises(KeyError, match="lenet5"):
        cp.build_model("inceptionv9", 1, 10, 1.0, 28)


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------

def test_augment_translates_within_pad():
    spec = cp.DATASETS["mnist"]
    x = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    x[:, 0, 14, 14] = 255
    out = cp.augment(x, spec, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out.sum((1, 2, 3)), torch.full((64,), 255))  # the pixel is moved, never lost
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert (rows - 14).abs().max() <= spec.pad and (cols - 14).abs().max() <= spec.pad
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # offsets really vary across the batch


def test_augment_flips_only_where_asked():
    x = torch.arange(32.0).repeat(16, 3, 32, 1)  # every row is 0..31
    no_pad = cp.DatasetSpec(**{**cp.DATASETS["cifar10"].__dict__, "pad": 0})
    out = cp.augment(x, no_pad, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == 31).sum().item()
    assert 0 < flipped < 16
    assert torch.equal(cp.augment(x[:, :1], cp.DatasetSpec(**{**no_pad.__dict__, "hflip": False}),
                                  torch.Generator()), x[:, :1])


def test_translation_pads_with_the_black_background():
    """The model must see a translated black image as black everywhere (the normalised value of 0),
    not framed by a border of another value: augmentation runs before normalisation."""
    spec = cp.DATASETS["mnist"]
    seen = []

    class Capture(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(28 * 28, 10)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.fc(x.flatten(1))

    model = Capture()
    accelerator = cp.make_accelerator("cpu", "no")
    optimizer, scheduler = cp.make_optimizer(model, dict(cp.RECIPE), total_steps=10)
    cp.train_batch(model, optimizer, scheduler, nn.CrossEntropyLoss(),
                   torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long),
                   spec, torch.Generator().manual_seed(0), accelerator)
    black = (0.0 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(seen[0], torch.full_like(seen[0], black))


@needs_mnist
def test_real_mnist_splits_are_seeded_and_disjoint():
    a = cp.load_splits(cp.DATASETS["mnist"], str(SHARED_DATA), 0, 5000, None, torch.device("cpu"))
    b = cp.load_splits(cp.DATASETS["mnist"], str(SHARED_DATA), 0, 5000, None, torch.device("cpu"))
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (55000, 5000, 10000)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (1, 28, 28)
    assert torch.equal(a.val_x, b.val_x)
    train_keys = {bytes(img.numpy()) for img in a.train_x[:20000]}
    assert not any(bytes(img.numpy()) in train_keys for img in a.val_x[:200])


def write_cifar_fixture(root: Path, per_batch: int = 40) -> Path:
    """A tiny CIFAR-10 in torchvision's cifar-10-batches-py format (random pixels, real layout)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cp.DATASETS["cifar10"].classes)}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar
    # The fixture's files cannot match the official md5s (batches and meta); only tests bypass that.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return write_cifar_fixture(tmp_path / "data")


def test_cifar10_path_loads_fixture(cifar_root):
    s = cp.load_splits(cp.DATASETS["cifar10"], str(cifar_root), 0, 5000, None, torch.device("cpu"))
    assert s.train_x.shape[1:] == (3, 32, 32) and s.train_x.dtype == torch.uint8
    assert len(s.test_y) == 40 and len(s.train_y) + len(s.val_y) == 200


def test_cifar10_grid_runs_on_fixture(cifar_root, tmp_path):
    rc = cp.main(["--models", "lenet5", "--datasets", "cifar10", "--epochs", "1",
                  "--subset", "100", "--data-dir", str(cifar_root),
                  "--results-dir", str(tmp_path / "res"), "--no-progress"])
    assert rc == 0
    record = cp.load_result(cp.result_path(tmp_path / "res", "cifar10", "lenet5"))
    assert record["status"] == "ok" and record["test"]["n_images"] == 40


def test_missing_dataset_offline_gives_clear_message(tmp_path, capsys):
    rc = cp.main(["--models", "lenet5", "--datasets", "mnist", "--epochs", "1",
                  "--data-dir", str(tmp_path / "nowhere"), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "could not be downloaded" in err and "train-images-idx3-ubyte" in err
    assert str((tmp_path / "nowhere").resolve()) in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# CLI errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--models", "resnet9000"), ("--datasets", "imagenet")])
def test_unknown_names_exit_nonzero_with_clear_error(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        cp.parse_args([flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert value in err and "choose from" in err


# ---------------------------------------------------------------------------------------------
# End to end on the real MNIST: results, resume, --force, --report, corrupt files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two models, 1 epoch, 300 images per split of the real MNIST."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found in ../shared/data")
    results = tmp_path_factory.mktemp("results")
    args = ["--models", "lenet5", "resnet", "--datasets", "mnist", "--epochs", "1", "--width", "0.125",
            "--subset", "300", "--data-dir", str(SHARED_DATA), "--results-dir", str(results),
            "--no-progress"]
    assert cp.main(args) == 0
    return results, args


def test_tiny_run_writes_complete_records(tiny_run):
    results, _ = tiny_run
    for model in ("lenet5", "resnet"):
        path = cp.result_path(results, "mnist", model)
        with open(path, "rb") as f:
            record = pickle.load(f)
        assert_plain(record)
        assert RECORD_KEYS <= set(record), RECORD_KEYS - set(record)
        assert HISTORY_KEYS == set(record["history"])
        assert TEST_KEYS == set(record["test"])
        assert record["status"] == "ok" and record["history"]["epoch"] == [1]
        t = record["test"]
        assert t["n_images"] == 300 and t["confusion_matrix"].shape == (10, 10)
        assert t["confusion_matrix"].sum() == 300
        assert math.isclose(t["accuracy"], np.trace(t["confusion_matrix"]) / 300, rel_tol=1e-6)
        assert 0 <= t["precision"] <= 1 and 0 <= t["recall"] <= 1 and 0 <= t["f1"] <= 1
        assert record["config"]["seed"] == 0 and record["versions"]["torch"] == torch.__version__
        assert record["params"] > 0 and record["throughput_img_s"] > 0


def test_tiny_run_writes_summaries_and_plots(tiny_run):
    results, _ = tiny_run
    with open(results / "cnn_results.pkl", "rb") as f:
        combined = pickle.load(f)
    assert set(combined["results"]["mnist"]) == {"lenet5", "resnet"}
    assert combined["best_by_validation"]["mnist"] in {"lenet5", "resnet"}
    with open(results / "cnn_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"LeNet-5", "ResNet-18"}
    assert set(cp.SUMMARY_COLUMNS) == set(rows[0])
    plots = results / "cnn" / "plots"
    best = combined["best_by_validation"]["mnist"]
    for name in ("curves_mnist.png", "test_metrics.png", f"confusion_mnist_{best}.png"):
        assert (plots / name).stat().st_size > 10_000, name


def test_rerun_skips_finished_pairs_and_force_retrains(tiny_run, capsys):
    results, args = tiny_run
    path = cp.result_path(results, "mnist", "lenet5")
    before = path.stat().st_mtime_ns
    only_lenet = ["--models", "lenet5"] + args[3:]
    assert cp.main(only_lenet) == 0
    assert "skipped" in capsys.readouterr().out
    assert path.stat().st_mtime_ns == before
    assert cp.main(only_lenet + ["--force"]) == 0
    assert path.stat().st_mtime_ns != before


def test_report_works_from_pickles_alone(tiny_run, tmp_path, capsys):
    results, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(results / "cnn", copy / "cnn", ignore=shutil.ignore_patterns("plots"))
    assert cp.main(["--report", "--results-dir", str(copy), "--data-dir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "LeNet-5" in out and "ResNet-18" in out and "best model" in out
    assert (copy / "cnn" / "plots" / "curves_mnist.png").exists()
    assert (copy / "cnn_summary.csv").exists()


@pytest.mark.parametrize("content", [b"\x80\x04 truncated", pickle.dumps({"something": "else"})])
def test_corrupt_or_foreign_pickle_is_named(tiny_run, tmp_path, capsys, content):
    results, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(results / "cnn", copy / "cnn")
    bad = cp.result_path(copy, "mnist", "resnet")
    bad.write_bytes(content)
    assert cp.main(["--report", "--results-dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert bad.read_bytes() == content  # nothing is overwritten


# ---------------------------------------------------------------------------------------------
# Divergence
# ---------------------------------------------------------------------------------------------

class NaNNet(nn.Module):
    """A model whose logits are NaN: stands in for a diverged run."""

    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) * float("nan")


def test_nan_loss_is_reported_as_failed_and_grid_goes_on(cifar_root, tmp_path, monkeypatch):
    monkeypatch.setitem(cp.MODELS_REGISTRY, "nannet", ("NaNNet", lambda c, k, w, s: NaNNet(c, k)))
    for budget in cp.PRESETS["cpu"].values():
        monkeypatch.setitem(budget, "nannet", (1, 1.0))
    res = tmp_path / "res"
    rc = cp.main(["--models", "nannet", "lenet5", "--datasets", "cifar10", "--epochs", "2",
                  "--subset", "100", "--data-dir", str(cifar_root), "--results-dir", str(res),
                  "--no-progress"])
    assert rc == 0
    failed = cp.load_result(cp.result_path(res, "cifar10", "nannet"))
    assert failed["status"] == "failed" and "nan" in failed["failure_reason"].lower()
    assert failed["test"] is None
    assert cp.load_result(cp.result_path(res, "cifar10", "lenet5"))["status"] == "ok"
    assert cp.best_models(cp.collect_results(res)) == {"cifar10": "lenet5"}
