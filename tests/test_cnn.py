"""Tests of cnn_project.py: architectures, data pipeline, the training grid, results and report.

Tests that need the real MNIST in ../shared/data skip when it is absent; CIFAR-10 is tested on a small
fixture in torchvision's format; nothing here touches the network.
"""

import contextlib
import csv
import io
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnn_project as cp

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_mnist = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                 reason="real MNIST not found in ../shared/data")

RECORD_KEYS = {"format", "model", "model_display_name", "dataset", "status", "failure_reason",
               "history", "best_epoch", "best_val_accuracy", "params", "train_time_s",
               "throughput_img_s", "target_val_accuracy", "time_to_target_s", "test", "classes",
               "wall_time_s", "config", "versions", "weights", "finished_utc", "macs_per_image",
               "train_flops_per_image", "train_flops", "confidence_threshold", "still_improving"}
HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                "epoch_time_s"}
TEST_KEYS = {"loss", "accuracy", "precision", "recall", "f1", "n_images", "confusion_matrix",
             "per_class_accuracy", "labels", "predictions", "confidence", "misclassified"}


# Every torchvision download fails at once, as offline (conftest.no_downloads).
pytestmark = pytest.mark.usefixtures("no_downloads")


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


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_biases_left_out(model: nn.Module) -> int:
    """The values a conv bias before each BN would add (references that keep those biases)."""
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None)


# Parameter counts of references nobody here wrote, at width 1.0 on 3x32x32 with 10 classes, each
# instantiated once (random init, no download) from its source:
#   kuangliu/pytorch-cifar (models/lenet.py LeNet, vgg.py VGG('VGG16'), resnet.py ResNet18,
#   googlenet.py GoogLeNet) and timm 1.0.31 legacy_xception(num_classes=10).
REFERENCE_PARAMS = {"lenet5": 62_006, "vgg": 14_728_266, "resnet": 11_173_962,
                    "googlenet": 6_166_250, "xception": 20_827_442}


@pytest.mark.parametrize("name", ["lenet5", "resnet", "xception"])
def test_parameters_equal_the_reference(name):
    """Same layers as the reference: the same count, to the parameter."""
    assert n_params(cp.build_model(name, 3, 10, 1.0, 32)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", ["vgg", "googlenet"])
def test_parameters_equal_the_reference_less_its_conv_biases(name):
    """kuangliu's VGG-16 and GoogLeNet keep a bias in every conv before BN (BN's shift makes it
    redundant); ours do not. Ours plus exactly those biases is the reference count."""
    model = cp.build_model(name, 3, 10, 1.0, 32)
    assert n_params(model) + conv_biases_left_out(model) == REFERENCE_PARAMS[name]


def test_se_resnet18_is_resnet18_plus_one_se_unit_per_block():
    """SE-ResNet-18 (Hu et al. 2018): ResNet-18's count plus, in each of its 8 basic blocks, an SE
    unit C -> C/16 -> C with biases (two blocks per width 64, 128, 256, 512)."""
    se = sum(2 * (c * (c // 16) + c // 16 + (c // 16) * c + c) for c in (64, 128, 256, 512))
    assert se == 89_080
    assert n_params(cp.build_model("senet", 3, 10, 1.0, 32)) == REFERENCE_PARAMS["resnet"] + se


def test_xception_exit_flow_widens_in_its_last_separable_conv():
    """Chollet 2017, Fig. 5: exit flow 728 -> 728 -> 1024 (then 1536, 2048)."""
    model = cp.build_model("xception", 3, 10, 1.0, 32)
    block = model.exit_flow[0]
    widths = [(m.pointwise.in_channels, m.pointwise.out_channels)
              for m in block.residual if isinstance(m, cp.SeparableConv2d)]
    assert widths == [(728, 728), (728, 1024)]


def test_alexnet_is_torchvisions_less_its_documented_changes():
    """torchvision's AlexNet (the paper's layers) at 10 classes, less what the docstring says is
    changed for 32 px: a 3x3/1 stem for the 11x11/4 one, FC1 on 256x2x2 instead of 256x6x6, BN
    (with bias-free convs) for LRN. conv2 keeps the paper's 5x5, conv3-5 their 3x3."""
    import torchvision
    ref = torchvision.models.alexnet(num_classes=10)
    ours = cp.build_model("alexnet", 3, 10, 1.0, 32)
    ref_convs = [m for m in ref.modules() if isinstance(m, nn.Conv2d)]
    our_convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert [c.weight.shape for c in our_convs[1:]] == [c.weight.shape for c in ref_convs[1:]]
    assert our_convs[1].kernel_size == (5, 5) and ref_convs[0].kernel_size == (11, 11)
    ref_fcs = [m for m in ref.modules() if isinstance(m, nn.Linear)]
    our_fcs = [m for m in ours.modules() if isinstance(m, nn.Linear)]
    assert [f.weight.shape for f in our_fcs[1:]] == [f.weight.shape for f in ref_fcs[1:]]
    stem = ref_convs[0].weight.numel() - our_convs[0].weight.numel()
    fc1 = ref_fcs[0].weight.numel() - our_fcs[0].weight.numel()
    bn = sum(p.numel() for m in ours.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert n_params(ours) == n_params(ref) - stem - fc1 + bn - conv_biases_left_out(ours)
    assert n_params(ours) == 23_470_026


def test_lenet5_forward_macs_counted_by_hand():
    """C1 28x28x6x25 + C3 10x10x16x150 + 400x120 + 120x84 + 84x10 multiply-adds."""
    model = cp.build_model("lenet5", 1, 10, 1.0, 28)
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    assert cp.count_flops(model, (1, 28, 28)) == 2 * macs == 2 * 416_520


def test_flop_count_draws_no_random_numbers_and_leaves_the_model():
    model = cp.build_model("alexnet", 3, 10, 0.25, 32)  # has dropout
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    assert cp.count_flops(model, (3, 32, 32), backward=True) > 2 * cp.count_flops(model, (3, 32, 32))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu" and model.training


def test_every_schedule_length_steps_without_error():
    """OneCycleLR divides by (warm-up steps - 1): 5 steps at 20% warm-up used to raise."""
    model = nn.Linear(2, 2)
    for total in range(1, 301):
        optimizer, scheduler = cp.make_optimizer(model, dict(cp.RECIPE), total)
        lrs = []
        for _ in range(total):
            optimizer.step()
            scheduler.step()
            lrs.append(scheduler.get_last_lr()[0])
        assert max(lrs) <= cp.RECIPE["lr"] * (1 + 1e-9), total


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
    x, y = torch.zeros(32, 1, 28, 28, dtype=torch.uint8), torch.zeros(32, dtype=torch.long)
    generators = {"shuffle": torch.Generator(), "augment": torch.Generator().manual_seed(0)}
    t = cp.Trainee(model, optimizer, scheduler, nn.CrossEntropyLoss(), generators, accelerator,
                   spec, dict(cp.RECIPE), steps_per_epoch=1, images_per_epoch=32)
    cp.fit(t, cp.Splits(x, y, x, y, x, y, spec=spec), 1, cp.new_progress())  # seen[0]: training
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
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cp.main(args) == 0
    print(out.getvalue())
    TINY_RUN_STDOUT[:] = [out.getvalue()]  # what the run printed, for the tests of its output
    return results, args


TINY_RUN_STDOUT = []


def test_a_runs_output_is_a_short_table_then_the_plots_and_a_predict_command(tiny_run):
    """After the training lines: a table no wider than 100 characters, the conclusion, and last the
    plots' folder and one --predict command for the dataset just trained."""
    results, _ = tiny_run
    out = TINY_RUN_STDOUT[0]
    table = out[out.index("\nMNIST (mnist): "):].splitlines()[1:]
    commands = [line for line in table if line.startswith("  python cnn_project.py")]
    assert len(commands) == 1  # a command is not wrapped: it is copied whole, with its paths
    too_wide = [line for line in table if len(line) > cp.WIDE and line not in commands]
    assert not too_wide, too_wide
    header = next(line for line in table if line.strip().startswith("model"))
    assert header.split() == ["model", "test", "accuracy", "verdict", "parameters", "train", "time"]
    rows = [line for line in table if re.match(r"  (LeNet-5|ResNet-18) +\d+\.\d\d% ", line)]
    assert len(rows) == 2 and "best on validation" in " ".join(rows)
    assert not re.search(r"\(p [0-9]", "\n".join(table))  # the p-values: --full-table
    last = out.rstrip("\n").splitlines()[-4:]
    assert last[-3] == f"plots: {results / 'cnn' / 'plots'}"
    assert "your own image of a handwritten digit" in last[-2]
    assert last[-1].split() == ["python", "cnn_project.py", "--predict", "YOUR_IMAGE.png", "--dataset",
                                "mnist", "--results-dir", str(results)]


def test_the_full_table_flag_prints_the_p_values_and_every_file(tiny_run, capsys):
    results, _ = tiny_run
    assert cp.main(["--report", "--full-table", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "verdict against the best (largest p)" in out and re.search(r"\(p [0-9.e+-]+\)", out)
    assert f"plot: {results / 'cnn' / 'plots' / 'curves_mnist.png'}" in out
    assert out.rstrip("\n").splitlines()[-1].startswith("  python cnn_project.py --predict YOUR_IMAGE.png")


def test_no_predict_command_without_weights(tmp_path, capsys):
    record = {"weights": None, "model_display_name": "LeNet-5"}
    cp.next_steps(tmp_path, {"mnist": {"lenet5": {0: record}}}, ["mnist"])
    assert capsys.readouterr().out.strip() == f"plots: {tmp_path / 'cnn' / 'plots'}"


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
        assert record["still_improving"] is False  # one epoch: nothing to rise from


def test_tiny_run_records_cost_and_what_each_network_gets_wrong(tiny_run):
    results, _ = tiny_run
    data = cp.load_splits(cp.DATASETS["mnist"], str(SHARED_DATA), 0, 5000, 300, torch.device("cpu"))
    for model in ("lenet5", "resnet"):
        r = cp.load_result(cp.result_path(results, "mnist", model))
        net = cp.build_model(model, 1, 10, r["config"]["width"], 28)
        assert r["macs_per_image"] == cp.count_flops(net, (1, 28, 28)) / 2 > 0
        assert r["train_flops_per_image"] > 2 * r["macs_per_image"]
        assert r["train_flops"] == r["train_flops_per_image"] * 256  # 1 step of 256 images
        t, matrix = r["test"], r["test"]["confusion_matrix"]
        assert t["predictions"].dtype == np.int8 and t["predictions"].shape == (300,)
        assert np.array_equal(t["labels"], data.test_y.numpy()) and t["labels"].dtype == np.int8
        rule = r["confidence_threshold"]  # chosen on the 300 validation images, never on test
        assert rule["rule"] == "max softmax probability" and rule["n_images"] == 300
        assert 0 < rule["typical"] <= rule["threshold"] <= 1 and rule["quantile"] == cp.OOD_VAL_QUANTILE
        assert rule["threshold"] == max(rule["typical"], rule["reliable"])
        assert np.array_equal(matrix, np.histogram2d(data.test_y.numpy(), t["predictions"],
                                                     bins=(range(11), range(11)))[0])
        assert np.allclose(t["per_class_accuracy"], matrix.diagonal() / matrix.sum(1))
        assert t["confidence"].dtype == np.float16 and (0 < t["confidence"]).all()
        assert (t["confidence"] <= 1).all()
        wrong = t["misclassified"]
        errors = int(300 - np.trace(matrix))
        assert len(wrong["index"]) == min(24, errors) > 0
        assert (wrong["true"] != wrong["predicted"]).all()
        assert np.array_equal(wrong["true"], data.test_y.numpy()[wrong["index"]])
        assert np.array_equal(wrong["predicted"], t["predictions"][wrong["index"]])
        assert np.array_equal(wrong["image"], data.test_x.numpy()[wrong["index"]])
        assert wrong["image"].dtype == np.uint8 and wrong["image"].shape[1:] == (1, 28, 28)
        assert (np.diff(wrong["confidence"]) <= 0).all()  # most confident mistakes first
        others = np.setdiff1d(np.flatnonzero(t["predictions"] != data.test_y.numpy()), wrong["index"])
        assert (t["confidence"][others] <= wrong["confidence"].min() + 1e-3).all()


def test_a_five_step_schedule_trains(tmp_path):
    """--epochs 1 --subset 1280: 5 optimizer steps of 256, the length that used to crash the grid."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found in ../shared/data")
    assert cp.main(["--models", "lenet5", "--datasets", "mnist", "--epochs", "1", "--subset", "1280",
                    "--data-dir", str(SHARED_DATA), "--results-dir", str(tmp_path),
                    "--no-progress"]) == 0
    assert cp.load_result(cp.result_path(tmp_path, "mnist", "lenet5"))["status"] == "ok"


def test_tiny_run_writes_summaries_and_plots(tiny_run):
    results, _ = tiny_run
    with open(results / "cnn_results.pkl", "rb") as f:
        combined = pickle.load(f)
    assert set(combined["results"]["mnist"]) == {"lenet5", "resnet"}
    assert set(combined["runs"]["mnist"]["lenet5"]) == {0}
    assert combined["best_by_validation"]["mnist"] in {"lenet5", "resnet"}
    pairs = combined["summary"]["mnist"]["pairs"]
    assert {p["verdict"] for p in pairs.values()} & {"best on validation"}
    with open(results / "cnn_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"LeNet-5", "ResNet-18"}
    assert set(cp.SUMMARY_COLUMNS) == set(rows[0])
    assert {"macs_per_image", "train_flops_mean", "train_time_s_mean", "test_accuracy_std",
            "verdict", "p_max"} <= set(rows[0])
    assert all(float(r["macs_per_image"]) > 0 and float(r["train_flops_mean"]) > 0 for r in rows)
    assert all(r["n_seeds"] == "1" and r["seeds"] == "0" and r["test_accuracy_std"] == "" for r in rows)
    with open(results / "cnn_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 and set(cp.RUN_COLUMNS) == set(runs[0])
    plots = results / "cnn" / "plots"
    for name in ("curves_mnist.png", "test_metrics.png", "cost_accuracy.png", "confusion_mnist.png",
                 "misclassified_mnist.png"):
        assert (plots / name).stat().st_size > 10_000, name


def test_plots_start_bars_at_zero_mark_the_best_and_leave_nothing_stale(tiny_run, tmp_path,
                                                                        monkeypatch):
    results, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(results / "cnn", copy / "cnn")
    stale = copy / "cnn" / "plots" / "confusion_mnist_vgg.png"
    stale.write_bytes(b"an old best model's figure")
    figures, save = {}, cp._figure

    def keep(plt, path, fig):
        figures[path.name] = [(ax.get_xlim(), [t.get_text() for t in ax.get_yticklabels()],
                               ax.get_legend_handles_labels()[1]) for ax in fig.axes]
        titles[path.name] = " ".join([fig._suptitle.get_text() if fig._suptitle else ""] +
                                     [ax.get_title() for ax in fig.axes])
        return save(plt, path, fig)

    titles = {}
    monkeypatch.setattr(cp, "_figure", keep)
    runs = cp.collect_runs(copy)
    written = cp.make_plots(runs, cp.summarize(runs), copy)
    assert not stale.exists() and all(p.exists() for p in written)
    best = cp.MODELS_REGISTRY[cp.best_models(runs)["mnist"]][0]
    (xlim, ticks, _), = figures["test_metrics.png"]
    assert xlim[0] == 0 and f"* {best}" in ticks and sum("*" in t for t in ticks) == 1
    assert all("1 epoch for every model" in t and "1 epochs" not in t for t in titles.values()
               if "epoch" in t), titles  # the one-epoch run: singular everywhere
    cost_axes = figures["cost_accuracy.png"]
    assert len(cost_axes) == 2
    assert all(labels == [f"best on validation: {best}"] for _, _, labels in cost_axes)


def _pair_row(dataset, model, accuracy, n_seeds=1, spread=0.0, best=False, verdict="differs"):
    """One made-up pair_rows row: what the comparison plots read."""
    key = next(k for k, v in cp.MODELS_REGISTRY.items() if v[0] == model)
    return dict(dataset=dataset, data=dataset.upper(), model=model, model_key=key, best=best,
                verdict=verdict, n_seeds=n_seeds, test_accuracy_mean=accuracy,
                test_accuracy_std=spread / 2 if n_seeds > 1 else None,
                test_accuracy_min=accuracy - spread / 2, test_accuracy_max=accuracy + spread / 2,
                train_flops_mean=3.1e12 * (1 + 0.01 * len(model)), train_time_s_mean=41.0 + len(model),
                timed_on="CPU")


def _shown_tick_labels(axis, lim) -> list:
    """The tick labels an axis shows: ticks inside its limits with text."""
    lo, hi = sorted(lim)
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs())
            if lo <= v <= hi and t.get_text()]


@pytest.mark.parametrize("accuracies", [[0.9871], [0.9912, 0.9915], [0.60, 0.995]])
def test_every_cost_axis_has_numbers_whatever_the_range(tmp_path, monkeypatch, accuracies):
    names = ("LeNet-5", "ResNet-18")
    rows = [_pair_row("mnist", names[i], a, best=i == 0) for i, a in enumerate(accuracies)]
    axes_seen = []

    def keep(plt, path, fig):
        fig.canvas.draw()
        axes_seen.extend((ax, ax.get_xlim(), ax.get_ylim()) for ax in fig.axes)
        for ax, xlim, ylim in axes_seen:
            assert len(_shown_tick_labels(ax.xaxis, xlim)) >= 2, (path.name, xlim)
            assert len(_shown_tick_labels(ax.yaxis, ylim)) >= 2, (path.name, ylim)
            assert ax.get_xlabel() and ax.get_ylabel()
        return cp._write_atomically(path, lambda f: fig.savefig(f, format="png")) or path

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    monkeypatch.setattr(cp, "_figure", keep)
    cp.plot_cost(plt, rows, tmp_path, {"mnist": "1 epoch for every model"})
    assert len(axes_seen) == 2
    plt.close("all")


@pytest.mark.parametrize("lo,hi", [(1.2, 1.37), (0.31, 1.4), (8.0, 40.0), (4e11, 6e13), (1.0, 1.01)])
def test_log_ticks_fall_inside_any_range(lo, hi):
    ticks = cp.log_ticks(lo, hi)
    assert 2 <= len(ticks) <= 10 and ticks == sorted(set(ticks))
    assert all(lo <= t <= hi for t in ticks), ticks


def test_budget_note_and_counts_are_singular_for_one():
    record = {"history": {"epoch": [1]}, "config": {"budget_rule": cp.BUDGET_RULE}}
    assert cp.budget_note({"lenet5": {0: record}}) == "1 epoch for every model"
    record = {"history": {"epoch": [1, 2]}, "config": {"budget_rule": cp.BUDGET_RULE}}
    assert cp.budget_note({"lenet5": {0: record}}) == "2 epochs for every model"
    assert cp._count(1, "test mistake") == "1 test mistake" and cp._count(3, "seed") == "3 seeds"


def test_test_metrics_is_one_readable_chart_per_dataset(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    import matplotlib.pyplot as plt
    names = [v[0] for v in cp.MODELS_REGISTRY.values()]
    rows = [_pair_row(d, m, 0.80 + 0.02 * i, n_seeds=3, spread=0.01, best=i == 3,
                      verdict="tied with the best within noise" if i == 4 else "differs")
            for d in ("mnist", "fashion_mnist", "cifar10") for i, m in enumerate(names)]
    path = cp.plot_test_metrics(plt, rows, tmp_path, dict.fromkeys(("mnist", "fashion_mnist",
                                                                    "cifar10"), "10 epochs"))
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width <= 1400 and height <= 2000, (width, height)


def test_mistakes_title_states_the_confidences_shown(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    confidences = np.array([0.95, 0.93, 0.92])
    wrong = {"index": np.arange(3), "image": np.zeros((3, 1, 8, 8), np.uint8),
             "true": np.array([0, 1, 2]), "predicted": np.array([1, 2, 0]), "confidence": confidences}
    record = {"test": {"misclassified": wrong, "n_images": 10, "confusion_matrix": np.eye(3) * 2 +
                       np.eye(3, k=1)}, "classes": ["a", "b", "c"], "model_display_name": "LeNet-5",
              "config": {"seed": 0, "label_smoothing": 0.1}, "data": {"label": "MNIST"}}
    titles = []
    monkeypatch.setattr(cp, "_figure", lambda plt, path, fig: titles.append(fig._suptitle.get_text()))
    monkeypatch.setattr(cp, "record_label", lambda r: "MNIST")
    cp.plot_misclassified(plt, "mnist", record, tmp_path)
    plt.close("all")
    assert "92% to 95%" in titles[0] and "4 test mistakes" in titles[0], titles
    assert "cluster" not in titles[0]


def test_grid_progress_eta_rescales_with_measured_pairs():
    lines = []

    def log(line, flush=False):
        lines.append(line)

    todo = {"lenet5": {"epochs": 10, "width": 1.0}, "vgg": {"epochs": 5, "width": 0.25}}
    plan = {"mnist": {0: todo}}
    grid = cp.GridProgress(plan, None, True, log)
    first = cp.SECONDS_PER_EPOCH["lenet5"] * 10 + cp.SECONDS_PER_EPOCH["vgg"] * 5
    grid.start("mnist", "lenet5", 0, todo["lenet5"])
    assert lines[-1].startswith("[run 1/2] mnist/lenet5: 10 epochs at width 1")
    assert lines[-1].endswith(f"grid ETA {cp._duration(first)}")
    lenet = cp.SECONDS_PER_EPOCH["lenet5"] * 10
    grid.finish("mnist", "lenet5", 0, 2 * lenet)  # this machine: 2x slower than the table
    grid.start("mnist", "vgg", 0, todo["vgg"])
    assert lines[-1].startswith("[run 2/2]")
    prior = cp.GridProgress.PRIOR_SECONDS  # the table's own weight as evidence
    scale = (2 * lenet + prior) / (lenet + prior)
    assert 1 < scale < 2
    assert lines[-1].endswith(f"grid ETA {cp._duration(scale * cp.SECONDS_PER_EPOCH['vgg'] * 5)}")
    unmeasured = cp.GridProgress(plan, 5500, False, log)  # e.g. the gpu preset
    unmeasured.start("mnist", "lenet5", 0, todo["lenet5"])
    assert lines[-1].endswith("grid ETA after the first pair")
    unmeasured.finish("mnist", "lenet5", 0, 3 * lenet / 10)  # subset 5,500: a tenth of the images
    unmeasured.start("mnist", "vgg", 0, todo["vgg"])  # no prior: 3x the table, exactly
    assert lines[-1].endswith(f"grid ETA {cp._duration(3 * cp.SECONDS_PER_EPOCH['vgg'] * 5 / 10)}")


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
    assert "LeNet-5" in out and "ResNet-18" in out and "best on validation" in out
    assert (copy / "cnn" / "plots" / "curves_mnist.png").exists()
    assert (copy / "cnn_summary.csv").exists()


@pytest.mark.parametrize("content", [b"\x80\x04 truncated", pickle.dumps({"something": "else"})])
def test_a_corrupt_or_foreign_record_is_set_aside_and_its_run_trains_again(tiny_run, tmp_path, capsys,
                                                                            content):
    """A truncated or foreign record is a stale result: --report names it in one line, keeps it
    under unreadable/ and reports the rest; a normal run then trains that run again."""
    results, args = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(results / "cnn", copy / "cnn")
    bad = cp.result_path(copy, "mnist", "resnet")
    bad.write_bytes(content)
    (copy / "cnn_results.pkl.x1y2.tmp").write_bytes(b"half a summary")  # left by a killed run
    assert cp.main(["--report", "--results-dir", str(copy)]) == 0
    out, err = capsys.readouterr()
    warning, = [line for line in err.splitlines() if line]
    assert warning.startswith(f"warning: {bad} is not a ") and "trains again" in warning
    assert "Traceback" not in err and "LeNet-5" in out and "ResNet-18" not in out
    kept, = (copy / "cnn" / "mnist" / "unreadable").glob("resnet-*.pkl")
    assert kept.read_bytes() == content and not bad.exists()  # moved aside, not deleted
    assert not list(copy.glob("*.tmp"))
    rerun = [a if a != str(results) else str(copy) for a in args]
    assert cp.main(rerun) == 0
    assert "mnist/resnet: ok" in capsys.readouterr().out
    assert cp.load_result(bad)["status"] == "ok" and kept.exists()


@pytest.mark.parametrize("name,key", [("plots", "plots_folder"), ("mnist", "mnist_folder"),
                                      ("Café Photos", "cafe_photos_"), ("日本の花", "images_")])
def test_image_folder_keys_are_safe_and_never_collide_with_the_programs_folders(tmp_path, name, key):
    spec = cp.image_folder_spec(str(tmp_path / name))
    assert spec.name.startswith(key) and spec.name.isascii() and spec.title == name
    assert spec.name == cp.image_folder_spec(str(tmp_path / name)).name  # stable
    assert spec.name not in cp.RESERVED_FOLDERS and spec.name not in cp.DATASETS


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
    res = tmp_path / "res"
    rc = cp.main(["--models", "nannet", "lenet5", "--datasets", "cifar10", "--epochs", "2",
                  "--subset", "100", "--data-dir", str(cifar_root), "--results-dir", str(res),
                  "--no-progress"])
    assert rc == 1  # a failed run is not a finished job, for a script; the grid still went on
    failed = cp.load_result(cp.result_path(res, "cifar10", "nannet"))
    assert failed["status"] == "failed" and "nan" in failed["failure_reason"].lower()
    assert failed["test"] is None
    assert cp.load_result(cp.result_path(res, "cifar10", "lenet5"))["status"] == "ok"
    assert cp.best_models(cp.collect_runs(res)) == {"cifar10": "lenet5"}


# ---------------------------------------------------------------------------------------------
# Precision by capability (faked: there is no GPU here)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability,name,expected", [
    ((7, 5), "Tesla T4", "fp16"), ((7, 0), "Tesla V100-SXM2-16GB", "fp16"),
    ((8, 0), "NVIDIA A100-SXM4-40GB", "bf16"), ((8, 9), "NVIDIA L4", "bf16"),
    ((9, 0), "NVIDIA H100", "bf16"), ((6, 0), "Tesla P100-PCIE-16GB", "no")])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as on a T4
    precision, why = cp.choose_precision("auto", on_cpu=False)
    assert precision == expected
    assert name in why and f"{capability[0]}.{capability[1]}" in why


def test_precision_on_cpu_and_as_asked(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert cp.choose_precision("auto", on_cpu=True) == ("bf16", "CPU with native bf16 (AVX-512 BF16)")
    assert cp.choose_precision("fp16", on_cpu=False)[0] == "fp16"
    assert cp.choose_precision("no", on_cpu=True)[0] == "no"


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_fp16_on_a_cpu_is_refused_in_one_line(monkeypatch, capsys, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a laptop: no CUDA GPU
    with pytest.raises(SystemExit) as exit_:
        cp.parse_args(["--precision", "fp16", "--device", device, "--models", "lenet5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and "--precision fp16 applies only on a CUDA GPU" in err[-1]
    with pytest.raises(ValueError, match="only on a CUDA GPU"):
        cp.choose_precision("fp16", on_cpu=True)
    assert cp.parse_args(["--precision", "no", "--device", device]).precision == "no"


def test_help_shows_defaults_and_the_precision_rule(capsys):
    with pytest.raises(SystemExit):
        cp.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "compute capability >= 8.0" in out and "fp16 with loss scaling" in out
    assert "(default: 256)" in out and "(default: ./results)" in out and "--predict" in out


# ---------------------------------------------------------------------------------------------
# Runs keyed by their settings; the committed reference run
# ---------------------------------------------------------------------------------------------

def test_other_settings_retrain_and_keep_the_old_record(tiny_run, tmp_path, capsys):
    results, args = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(results, copy)
    old = cp.load_result(cp.result_path(copy, "mnist", "lenet5"))
    base = ["--models", "lenet5"] + args[3:]
    base[base.index("--results-dir") + 1] = str(copy)
    epochs = base.index("--epochs") + 1
    base[epochs] = "2"  # the README's `--epochs N` example: other settings, so it trains
    assert cp.main(base) == 0
    out = capsys.readouterr().out
    assert "its record has other settings (epochs 1 -> 2)" in out and "training" in out
    new = cp.load_result(cp.result_path(copy, "mnist", "lenet5"))
    assert new["history"]["epoch"] == [1, 2] and new["config"]["epochs"] == 2
    kept = [p for p in (copy / "cnn" / "mnist" / "superseded").glob("lenet5-*.pkl")
            if cp.load_result(p)["finished_utc"] == old["finished_utc"]]
    assert len(kept) == 1 and cp.load_result(kept[0])["history"] == old["history"]
    assert kept[0].with_suffix(".safetensors").is_file()  # its weights went with it
    # The table says the rows differ in nothing but their own epochs: same preset, seed, ...
    assert "note:" not in out
    assert cp.main(base) == 0 and "finished earlier with these settings" in capsys.readouterr().out


def test_reference_run_does_not_stop_a_first_run():
    """The committed CPU run lives in results/reference_cpu; a user's default results/cnn is empty
    in a fresh clone, so `python cnn_project.py` trains."""
    tracked = subprocess.run(["git", "ls-files", "results/cnn", "results/cnn_results.pkl"],
                             cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode:
        pytest.skip("not a git checkout")
    assert tracked.stdout == ""
    reference = cp.collect_results(ROOT / "results" / "reference_cpu")
    assert set(reference) == {"mnist", "fashion_mnist", "cifar10"}
    assert all(len(by_model) == 7 for by_model in reference.values())
    for dataset, by_model in reference.items():  # all 21 trained under the rule, the CPU preset's epochs
        for r in by_model.values():
            assert r["config"]["budget_rule"] == cp.BUDGET_RULE and r["config"]["preset"] == "cpu"
            assert r["config"]["epochs"] == cp.PRESETS["cpu"]["epochs"][dataset], (dataset, r["model"])
            if dataset != "cifar10":  # the official files
                assert r["config"]["data"] == "torchvision" and r["data"]["source"]["kind"] == "torchvision"
    for r in reference["cifar10"].values():  # on the named JPEG copy
        assert r["data"]["label"] == "CIFAR-10, JPEG q75 copy"
        assert r["data"]["source"]["files"] == 60_000 and r["data"]["source"]["formats"] == ["JPEG q75"]


def test_reference_records_hold_cost_and_mistakes_and_its_best_weights_predict(tmp_path, capsys):
    """The committed CPU run: every record has its cost and what it gets wrong; each dataset has
    committed weights for the model --predict picks (the best on validation that kept weights), and
    `--predict` with them names real test images (saved as PNGs, as a user would) correctly."""
    reference = ROOT / "results" / "reference_cpu"
    results = cp.collect_results(reference)
    for dataset, by_model in results.items():
        for model, r in by_model.items():
            spec = cp.spec_of(r)
            shape = (spec.in_channels, spec.image_size, spec.image_size)
            net = cp.build_model(model, shape[0], 10, r["config"]["width"], shape[1])
            assert r["params"] == n_params(net), (dataset, model)
            assert r["macs_per_image"] == cp.count_flops(net, shape) / 2, (dataset, model)
            assert r["train_flops"] > 0 and len(r["test"]["predictions"]) == 10_000
            assert len(r["test"]["misclassified"]["index"]) == 24
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found in ../shared/data")
    from PIL import Image
    for dataset in cp.best_models(cp.collect_runs(reference)):
        model, seed, _ = cp.predict_run(reference, dataset, list(cp.MODELS_REGISTRY))
        assert cp.weights_path(reference, dataset, model, seed).is_file(), (dataset, model, seed)
        if dataset in ("fashion_mnist", "cifar10"):  # the best on validation kept weights: no fallback
            assert (model, seed) == (cp.best_models(cp.collect_runs(reference))[dataset], 0)
        if dataset == "cifar10":
            continue  # below, on the JPEG files themselves
        data = cp.load_splits(cp.DATASETS[dataset], str(SHARED_DATA), 0, 5000, 20, torch.device("cpu"))
        paths = []
        for i in range(20):
            paths.append(tmp_path / f"{dataset}_{i}.png")
            Image.fromarray(data.test_x[i, 0].numpy()).save(paths[-1])
        predicted = cp.predict(cp.parse_args(["--predict", *map(str, paths), "--dataset", dataset,
                                              "--results-dir", str(reference)]))
        classes = cp.DATASETS[dataset].classes
        right = sum(top[0][0] == classes[int(y)] for (_, top, _), y in zip(predicted, data.test_y))
        assert right >= 17, (dataset, right)  # the test set's first 20 images, 99.5% / 93% models
        confident = sum(verdict.startswith("confident") for _, _, verdict in predicted)
        assert confident >= 15, (dataset, confident)  # the low-confidence rule is not always on
    copy = SHARED_DATA / "CIFAR10-JPEG" / "test"
    if not copy.is_dir():
        pytest.skip("the CIFAR-10 JPEG copy is not in ../shared/data")
    classes = cp.DATASETS["cifar10"].classes
    paths = [copy / name / f"{i:04d}.jpg" for name in classes for i in range(4)]  # 40 test images
    predicted = cp.predict(cp.parse_args(["--predict", *map(str, paths), "--dataset", "cifar10",
                                          "--results-dir", str(reference)]))
    right = sum(top[0][0] == path.parent.name for (_, top, _), path in zip(predicted, paths))
    best = results["cifar10"][cp.best_models(cp.collect_runs(reference))["cifar10"]]["test"]["accuracy"]
    assert right >= 0.7 * len(paths), (right, best)  # a model of about 85% on the whole test set


def test_mixed_settings_are_named_in_the_table(tiny_run, capsys):
    results, _ = tiny_run
    runs = cp.collect_runs(results)
    resnet = runs["mnist"]["resnet"][0]
    runs["mnist"]["resnet"][0] = dict(resnet, config=dict(resnet["config"], preset="gpu", precision="fp16"))
    cp.print_table(runs, cp.summarize(runs))
    out = capsys.readouterr().out
    precision = repr(str(runs["mnist"]["lenet5"][0]["config"]["precision"]))
    assert f"note: the mnist runs were trained with different precision ({', '.join(sorted([precision, repr('fp16')]))}), " \
           "preset ('cpu', 'gpu')" in out


def test_every_committed_record_opens_without_torch():
    code = ("import glob, pickle, sys\n"
            "sys.modules['torch'] = None  # import torch now fails\n"
            "paths = glob.glob('results/**/*.pkl', recursive=True)\n"
            "for p in paths:\n"
            "    with open(p, 'rb') as f:\n"
            "        pickle.load(f)\n"
            "print(len(paths))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) >= 16  # 14 reference records, their summary, seq2seq's results


# ---------------------------------------------------------------------------------------------
# Kill and resume (real SIGKILLs of a subprocess)
# ---------------------------------------------------------------------------------------------

def cli(results_dir: Path, *args: str) -> list:
    return [sys.executable, str(ROOT / "cnn_project.py"), *args, "--data-dir", str(SHARED_DATA),
            "--results-dir", str(results_dir), "--no-progress"]


def as_lists(obj):
    """NumPy arrays (at any depth of dicts) as lists, so that == compares every value."""
    if isinstance(obj, dict):
        return {k: as_lists(v) for k, v in obj.items()}
    return obj.tolist() if isinstance(obj, np.ndarray) else obj


def comparable(record: dict) -> dict:
    """A record without its timings, which no two runs share."""
    history = {k: v for k, v in record["history"].items() if k != "epoch_time_s"}
    test = as_lists(record["test"])
    return {"history": history, "test": test, "best_epoch": record["best_epoch"],
            "best_val_accuracy": record["best_val_accuracy"], "status": record["status"]}


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


@needs_mnist
def test_ctrl_c_saves_says_so_and_exits_130(tmp_path):
    """SIGINT (Ctrl-C, a notebook's stop button) after an epoch: exit status 130, one line saying
    that finished work is kept, and the checkpoint there for the rerun."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found in ../shared/data")
    # The child gets Ctrl-C's default handling even when the tests run in the background (a shell's `&`
    # makes its children ignore SIGINT, and Python then never raises KeyboardInterrupt).
    proc = subprocess.Popen(cli(tmp_path, "--models", "vgg", "--datasets", "mnist", "--epochs", "50",
                                "--width", "0.125", "--subset", "512"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if "epoch  1/50" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: finished pairs and the last epoch")
    assert "Traceback" not in err and "mnist/vgg: ok" not in out
    assert cp.checkpoint_path(tmp_path, "mnist", "vgg").is_file()


# One reference run for both kill tests: two models with and without dropout, on two datasets,
# trained without interruption (a pair trained alone gives the same record as in a grid).
KILL_ARGS = ("--epochs", "3", "--width", "0.125", "--subset", "1500")
KILL_GRID = ("--models", "lenet5", "alexnet", "--datasets", "mnist", "fashion_mnist")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The results folder of the kill tests' grid, trained without interruption."""
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir() or not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST and Fashion-MNIST not found in ../shared/data")
    ref = tmp_path_factory.mktemp("uninterrupted")
    done = subprocess.run(cli(ref, *KILL_GRID, *KILL_ARGS), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return ref


def test_killed_after_epoch_k_resumes_bit_identical(tmp_path, uninterrupted):
    # AlexNet has dropout: the resumed run must also restore torch's global RNG.
    args = ("--models", "alexnet", "--datasets", "mnist", *KILL_ARGS)
    proc = subprocess.Popen(cli(tmp_path, *args), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch  1/3" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert cp.checkpoint_path(tmp_path, "mnist", "alexnet").exists()
    assert not cp.result_path(tmp_path, "mnist", "alexnet").exists()
    rerun = subprocess.run(cli(tmp_path, *args), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    done = int(rerun.stdout.split("resuming from the checkpoint after epoch ")[1].split()[0])
    assert 1 <= done < 3 and "epoch  1/3" not in rerun.stdout and "epoch  3/3" in rerun.stdout
    assert not cp.checkpoint_path(tmp_path, "mnist", "alexnet").exists()
    a, b = (cp.load_result(cp.result_path(d, "mnist", "alexnet")) for d in (uninterrupted, tmp_path))
    assert comparable(a) == comparable(b)
    wa, wb = (load_weights(cp.weights_path(d, "mnist", "alexnet")) for d in (uninterrupted, tmp_path))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# The moments of the kills, each counted from the run's own output so that it lands inside the work
# on a fast or a slow machine: (epoch lines of this run to wait for, then seconds to wait). An epoch
# line is printed just after that epoch's checkpoint is written, and each run resumes where the
# previous kill left it: 2 s into start-up (imports, data loading); as LeNet-5's epoch 2 starts
# (a checkpoint on disk); right after its last epoch (scoring, its record and weights being
# written); mid-epoch in AlexNet; and after AlexNet's last epoch (its record, or the next pair).
KILL_MOMENTS = ((0, 2.0), (1, 0.0), (2, 0.0), (2, 0.3), (1, 0.15))


def test_sigkills_at_chosen_moments_lose_nothing(tmp_path, uninterrupted):
    run, args = tmp_path / "run", (*KILL_GRID, *KILL_ARGS)
    finished, saw_checkpoint = {}, False
    for after_epochs, delay in KILL_MOMENTS:
        proc = subprocess.Popen(cli(run, *args), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        seen = 0
        for line in proc.stdout if after_epochs else ():
            seen += re.search(r" epoch +\d+/\d+: ", line) is not None  # not "resuming ... after epoch k"
            if seen == after_epochs:
                break
        time.sleep(delay)
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        for path in run.rglob("*.pkl"):
            cp.load_result(path)  # raises on a corrupt record
            if path.name == "cnn_results.pkl":  # the combined summary: rewritten by every report
                continue
            mtime = path.stat().st_mtime_ns
            assert finished.setdefault(path, mtime) == mtime, f"{path} was retrained"
        for path in run.rglob("*.checkpoint.pt"):
            saw_checkpoint = True
            assert torch.load(path, weights_only=True)["format"] == cp.CHECKPOINT_FORMAT
        assert not list(run.rglob("*.corrupt"))
    assert saw_checkpoint and finished, "no kill landed after a checkpoint or a finished pair"
    final = subprocess.run(cli(run, *args), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    assert not list(run.rglob("*.checkpoint.pt")) and not list(run.rglob("*.tmp"))
    for dataset in ("mnist", "fashion_mnist"):
        for model in ("lenet5", "alexnet"):
            a, b = (cp.load_result(cp.result_path(d, dataset, model)) for d in (uninterrupted, run))
            assert comparable(a) == comparable(b), (dataset, model)


# ---------------------------------------------------------------------------------------------
# Kept weights and --predict
# ---------------------------------------------------------------------------------------------

def user_picture(tmp_path: Path, digit: torch.Tensor) -> Path:
    """An MNIST digit as a user's photo would be: dark ink on white paper, 6x larger, off-centre,
    in RGB with a grey paper tone."""
    from PIL import Image
    ink = 255 - digit.numpy()
    ink = np.clip(ink * 0.85 + 20, 0, 255).astype(np.uint8)  # paper ~237, ink ~20
    canvas = np.full((240, 200), 237, dtype=np.uint8)
    big = np.asarray(Image.fromarray(ink).resize((168, 168), Image.Resampling.BILINEAR))
    canvas[50:218, 10:178] = big
    path = tmp_path / "digit.png"
    Image.fromarray(canvas).convert("RGB").save(path)
    return path


@needs_mnist
def test_prepare_image_makes_a_photo_look_like_mnist(tmp_path):
    s = cp.load_splits(cp.DATASETS["mnist"], str(SHARED_DATA), 0, 5000, 50, torch.device("cpu"))
    for i in range(5):
        digit = s.test_x[i, 0]
        x = cp.prepare_image(str(user_picture(tmp_path, digit)), cp.DATASETS["mnist"])
        assert x.shape == (1, 1, 28, 28) and x.dtype == torch.uint8
        a, b = x[0, 0].float().flatten(), digit.float().flatten()
        corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
        assert corr > 0.8, (i, corr)  # without inversion it would be strongly negative


def test_prepare_image_cifar_is_a_resized_rgb_square(tmp_path):
    from PIL import Image
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (640, 480), (200, 30, 30)).save(path)
    x = cp.prepare_image(str(path), cp.DATASETS["cifar10"])
    assert x.shape == (1, 3, 32, 32) and abs(int(x[0, 0, 16, 16]) - 200) <= 3


def test_weights_are_kept_and_predict_prints_top3(tiny_run, tmp_path, capsys):
    results, _ = tiny_run
    from safetensors.torch import load_file
    state = load_file(cp.weights_path(results, "mnist", "lenet5"))
    record = cp.load_result(cp.result_path(results, "mnist", "lenet5"))
    assert record["weights"] == "lenet5.safetensors" and sum(v.numel() for k, v in state.items()
                                                              if "running" not in k and "num_batches" not in k) == record["params"]
    from PIL import Image
    img = tmp_path / "seven.png"
    Image.new("L", (100, 100), 255).save(img)
    assert cp.main(["--predict", str(img), "--dataset", "mnist", "--model", "lenet5",
                    "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith(str(img)))
    probs = [float(p.rstrip("%")) for p in line.split(": ", 1)[1].replace(",", "").split()[1::2]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 100.05
    # No --model: the best on validation; its weights are the ones the record points to.
    assert cp.main(["--predict", str(img), "--dataset", "mnist", "--results-dir", str(results)]) == 0
    best = cp.best_models(cp.collect_runs(results))["mnist"]
    assert cp.MODELS_REGISTRY[best][0] in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing image", "not an image", "no weights", "two datasets"])
def test_predict_errors_are_one_line(tiny_run, tmp_path, capsys, case):
    results, _ = tiny_run
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    from PIL import Image
    good = tmp_path / "ok.png"
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(good)  # transparent: flattened onto white
    argv = {"missing image": ["--predict", str(tmp_path / "nope.png"), "--dataset", "mnist",
                              "--model", "lenet5"],
            "not an image": ["--predict", str(text), "--dataset", "mnist", "--model", "lenet5"],
            "no weights": ["--predict", str(good), "--dataset", "mnist", "--model", "vgg"],
            "two datasets": ["--predict", str(good), "--datasets", "mnist", "cifar10"]}[case]
    assert cp.main(argv + ["--results-dir", str(results)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    expected = {"missing image": "no such file", "not an image": "not an image",
                "no weights": "no trained weights", "two datasets": "needs one dataset"}[case]
    assert expected in err
