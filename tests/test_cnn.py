"""Tests of cnn_project.py: architectures, data pipeline, the training grid, results and report.

Tests that need the real MNIST in ../shared/data skip when it is absent; CIFAR-10 is tested on a small
fixture in torchvision's format; nothing here touches the network.
"""

import csv
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
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
               "wall_time_s", "config", "versions", "weights", "finished_utc"}
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


def test_precision_on_cpu_and_as_asked():
    assert cp.choose_precision("auto", on_cpu=True) == ("bf16", "CPU")
    assert cp.choose_precision("fp16", on_cpu=False)[0] == "fp16"
    assert cp.choose_precision("no", on_cpu=True)[0] == "no"


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
    assert set(reference) == {"mnist", "fashion_mnist"}
    assert all(len(by_model) == 7 for by_model in reference.values())


def test_mixed_settings_are_named_in_the_table(tiny_run, capsys):
    results, _ = tiny_run
    collected = cp.collect_results(results)
    collected["mnist"]["resnet"] = dict(collected["mnist"]["resnet"], config=dict(
        collected["mnist"]["resnet"]["config"], preset="gpu", precision="fp16"))
    cp.print_table(collected)
    out = capsys.readouterr().out
    assert "note: the mnist rows were trained with different precision ('bf16', 'fp16'), " \
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


def comparable(record: dict) -> dict:
    """A record without its timings, which no two runs share."""
    history = {k: v for k, v in record["history"].items() if k != "epoch_time_s"}
    test = dict(record["test"], confusion_matrix=record["test"]["confusion_matrix"].tolist())
    return {"history": history, "test": test, "best_epoch": record["best_epoch"],
            "best_val_accuracy": record["best_val_accuracy"], "status": record["status"]}


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


@needs_mnist
def test_killed_after_epoch_k_resumes_bit_identical(tmp_path):
    # AlexNet has dropout: the resumed run must also restore torch's global RNG.
    args = ("--models", "alexnet", "--datasets", "mnist", "--epochs", "3", "--width", "0.125",
            "--subset", "2000")
    assert subprocess.run(cli(tmp_path / "ref", *args), capture_output=True).returncode == 0
    proc = subprocess.Popen(cli(tmp_path / "run", *args), stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "epoch  1/3" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert cp.checkpoint_path(tmp_path / "run", "mnist", "alexnet").exists()
    assert not cp.result_path(tmp_path / "run", "mnist", "alexnet").exists()
    rerun = subprocess.run(cli(tmp_path / "run", *args), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    done = int(rerun.stdout.split("resuming from the checkpoint after epoch ")[1].split()[0])
    assert 1 <= done < 3 and "epoch  1/3" not in rerun.stdout and "epoch  3/3" in rerun.stdout
    assert not cp.checkpoint_path(tmp_path / "run", "mnist", "alexnet").exists()
    a, b = (cp.load_result(cp.result_path(tmp_path / d, "mnist", "alexnet")) for d in ("ref", "run"))
    assert comparable(a) == comparable(b)
    wa, wb = (load_weights(cp.weights_path(tmp_path / d, "mnist", "alexnet")) for d in ("ref", "run"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_mnist
def test_ten_sigkills_at_random_moments_lose_nothing(tmp_path):
    if not (SHARED_DATA / "FashionMNIST" / "raw").is_dir():
        pytest.skip("real Fashion-MNIST not found in ../shared/data")
    args = ("--models", "lenet5", "alexnet", "--datasets", "mnist", "fashion_mnist", "--epochs", "3",
            "--width", "0.125", "--subset", "1500")
    assert subprocess.run(cli(tmp_path / "ref", *args), capture_output=True).returncode == 0
    run, rng = tmp_path / "run", random.Random(0)
    finished, saw_checkpoint = {}, False
    for _ in range(10):
        proc = subprocess.Popen(cli(run, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 7.0))
        proc.kill()
        proc.wait(timeout=60)
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
    assert saw_checkpoint
    final = subprocess.run(cli(run, *args), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was retrained"
    assert not list(run.rglob("*.checkpoint.pt")) and not list(run.rglob("*.tmp"))
    for dataset in ("mnist", "fashion_mnist"):
        for model in ("lenet5", "alexnet"):
            a, b = (cp.load_result(cp.result_path(d, dataset, model)) for d in (tmp_path / "ref", run))
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
    best = cp.best_models(cp.collect_results(results))["mnist"]
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
