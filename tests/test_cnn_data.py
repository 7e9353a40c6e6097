"""Tests of cnn_project.py's data sources, budget rule and CPU precision: CIFAR-10 from an
image-folder copy, a learner's own image folder (trained end to end by all seven models), the
decode cache, the one-line errors of a broken folder, equal epochs for every model, and bf16 only
on CPUs that have it natively (faked both ways). Every folder here is made by the test."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnn_project as cp


# Every torchvision download fails at once, as offline (conftest.no_downloads).
pytestmark = pytest.mark.usefixtures("no_downloads")


def save_image(path: Path, size: tuple, colour: tuple, rng, mode: str = "RGB", **kwargs) -> Path:
    """A noisy image of one dominant colour (so the two classes below are learnable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(rng.normal(colour, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    (img.convert("L") if mode == "L" else img).save(path, **kwargs)
    return path


def own_folder(root: Path, per_class: int = 20) -> Path:
    """A learner's folder: two classes (red things, blue things), PNG and JPEG mixed, odd sizes,
    no train/test split (the program splits it)."""
    rng = np.random.default_rng(0)
    for name, colour in (("red_things", (200, 40, 40)), ("blue_things", (40, 40, 200))):
        for i in range(per_class):
            size = (int(rng.integers(17, 61)), int(rng.integers(17, 61)))
            ext = ".png" if i % 2 else ".jpg"
            save_image(root / name / f"img_{i:02d}{ext}", size, colour, rng)
    return root


def cifar_copy(root: Path, train: int = 3, test: int = 1, quality: int = 75) -> Path:
    """An image-folder copy of CIFAR-10 in the layout of ../shared/data/CIFAR10-JPEG."""
    rng = np.random.default_rng(1)
    for split, n in (("train", train), ("test", test)):
        for k, name in enumerate(cp.DATASETS["cifar10"].classes):
            for i in range(n):
                save_image(root / split / name / f"{i:04d}.jpg", (32, 32), (25 * k, 100, 250 - 25 * k),
                           rng, quality=quality)
    return root


def run(*args: str) -> int:
    return cp.main([*args, "--no-progress"])


# ---------------------------------------------------------------------------------------------
# A learner's own folder
# ---------------------------------------------------------------------------------------------

def test_own_folder_trains_all_seven_models_and_predicts(tmp_path, capsys):
    folder = own_folder(tmp_path / "My Things")
    res, cache = tmp_path / "res", tmp_path / "cache"
    assert run("--datasets", str(folder), "--image-size", "24", "--epochs", "2", "--width", "0.125",
               "--results-dir", str(res), "--cache-dir", str(cache)) == 0
    out = capsys.readouterr().out
    assert "my_things (My Things (image folder), image folder" in out and "40 files" in out
    results = cp.collect_results(res)
    assert list(results) == ["my_things"] and len(results["my_things"]) == 7
    for model, r in results["my_things"].items():
        assert r["status"] == "ok", model
        assert r["classes"] == ["blue_things", "red_things"]
        source = r["data"]["source"]
        assert source["kind"] == "image folder" and source["files"] == 40
        assert source["train_files"] == 32 and source["test_files"] == 8  # 20% of each class
        assert sorted(source["formats"]) == ["JPEG q75", "PNG"] and len(source["sha256"]) == 64
        spec = cp.spec_of(r)
        assert (spec.in_channels, spec.image_size, spec.pad) == (3, 24, 3)
        assert spec.mean[2] > spec.mean[1] and spec.mean[0] > spec.mean[1]  # red and blue, little green
        assert r["test"]["n_images"] == 8
        assert r["config"]["budget_rule"] == cp.BUDGET_RULE
    # --predict with the kept weights of the best model, named by the folder or by its results name
    picture = save_image(tmp_path / "mine.png", (50, 31), (210, 30, 30), np.random.default_rng(5))
    for name in (str(folder), "my_things"):
        predicted = cp.predict(cp.parse_args(["--predict", str(picture), "--dataset", name,
                                              "--results-dir", str(res)]))
        assert {c for c, _ in predicted[0][1]} == {"red_things", "blue_things"}
        assert abs(sum(p for _, p in predicted[0][1]) - 1) < 1e-4
    assert run("--report", "--results-dir", str(res)) == 0
    assert "My Things (image folder)" in capsys.readouterr().out


def test_grey_folder_with_train_and_test_is_read_as_one_channel(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 12), ("test", 3)):
        for name, level in (("dark", 40), ("light", 200)):
            for i in range(n):
                save_image(tmp_path / "g" / split / name / f"{i}.png", (20, 20), (level,) * 3, rng, "L")
    data = cp.load_splits(cp.image_folder_spec(tmp_path / "g"), "unused", 0, 5000, None,
                          torch.device("cpu"), cache_dir=None)
    assert data.spec.in_channels == 1 and data.spec.image_size == 20
    assert data.spec.classes == ("dark", "light") and len(data.test_y) == 6
    assert data.source["split"] == "train/ and test/"
    assert len(data.val_y) == 2 and len(data.train_y) == 22  # a tenth of the 24 held out


def test_a_val_folder_beside_train_and_test_is_the_validation_split(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for split, n, shift in (("train", 8, 0), ("val", 3, 20), ("test", 2, 0)):  # val/ a bit lighter
        for name, level in (("dark", 40), ("light", 200)):
            for i in range(n):
                save_image(tmp_path / "g" / split / name / f"{i}.png", (20, 20), (level + shift,) * 3, rng, "L")
    (tmp_path / "g" / "notes.txt").write_text("where the photos came from")
    spec = cp.image_folder_spec(tmp_path / "g")
    seeded = [cp.load_splits(spec, "unused", seed, 5000, None, torch.device("cpu"), cache_dir=tmp_path / "c")
              for seed in (0, 1)]
    for data in seeded:
        assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (16, 6, 4)
        assert sorted(data.val_y.tolist()) == [0, 0, 0, 1, 1, 1]
        assert data.source["split"] == "train/, val/ and test/" and data.source["val_files"] == 6
    assert torch.equal(seeded[0].val_x, seeded[1].val_x)  # the folder's, whatever the seed
    val_mean = seeded[0].val_x.float().mean()
    assert val_mean > seeded[0].train_x.float().mean() + 10  # val/'s lighter images, not train/'s
    out = capsys.readouterr().out
    assert "val/ is the validation split" in out and "notes.txt" in out
    key = cp.folder_listing(tmp_path / "g", None, 0)[3]
    shutil.rmtree(tmp_path / "g" / "val")
    assert cp.folder_listing(tmp_path / "g", None, 0)[3] != key  # another split: other data
    data = cp.load_splits(spec, "unused", 0, 5000, None, torch.device("cpu"), cache_dir=tmp_path / "c")
    assert (len(data.train_y), len(data.val_y)) == (15, 1)  # without val/: held out of train/


def test_folder_cache_is_used_and_a_changed_folder_is_decoded_again(tmp_path, monkeypatch):
    folder, cache = own_folder(tmp_path / "f", per_class=6), tmp_path / "cache"
    calls = []
    real = cp.decode_images
    monkeypatch.setattr(cp, "decode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = cp.image_folder_spec(folder)
    first = cp.load_splits(spec, "", 0, 5000, None, torch.device("cpu"), 16, cache)
    again = cp.load_splits(spec, "", 0, 5000, None, torch.device("cpu"), 16, cache)
    assert len(calls) == 2  # train and test, decoded once
    assert torch.equal(first.train_x, again.train_x) and len(list(cache.glob("*.pt"))) == 1
    save_image(folder / "red_things" / "new.png", (30, 30), (200, 40, 40), np.random.default_rng(3))
    changed = cp.load_splits(spec, "", 0, 5000, None, torch.device("cpu"), 16, cache)
    assert len(calls) == 4 and changed.source["files"] == 13
    assert changed.source["sha256"] != first.source["sha256"]
    assert cp.data_identity(spec, "", 16, 0) != cp.data_identity(spec, "", 16, 1)  # the split's seed


def test_an_unwritable_cache_only_costs_the_decoding(tmp_path, capsys):
    folder = own_folder(tmp_path / "f", per_class=5)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    data = cp.load_splits(cp.image_folder_spec(folder), "", 0, 5000, None, torch.device("cpu"), 16,
                          blocked / "cache")
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 10
    assert "could not cache" in capsys.readouterr().out


def pair_files(res: Path) -> dict:
    """The records and weights under a results folder, with their bytes."""
    return {p: p.read_bytes() for p in (res / "cnn").rglob("*") if p.suffix in (".pkl", ".safetensors")}


def break_folder(folder: Path, problem: str) -> Path:
    """Break a folder of own_folder's in one way; return the file or folder to blame."""
    if problem == "not an image":
        (folder / "red_things" / "notes.png").write_text("this is not a picture")
        return folder / "red_things" / "notes.png"
    if problem == "empty class":
        (folder / "green_things").mkdir()
        return folder / "green_things"
    if problem == "one class":
        for p in (folder / "blue_things").iterdir():
            p.unlink()
        (folder / "blue_things").rmdir()
        return folder
    files = sorted(folder.rglob("*.*"))  # mixed sizes / not square: all 20x20 but one
    for p in files:
        Image.open(p).convert("RGB").resize((20, 20)).save(p)
    Image.open(files[3]).convert("RGB").resize((24, 24) if problem == "mixed sizes" else (20, 30)).save(files[3])
    return files[3]


@pytest.mark.parametrize("problem,says", [
    ("not an image", "is not an image Pillow can read"), ("empty class", "holds no images"),
    ("one class", "at least two"), ("mixed sizes", "mixed sizes"), ("not square", "not square")])
def test_a_broken_folder_is_one_clear_line_and_loses_nothing(tmp_path, capsys, problem, says):
    folder = own_folder(tmp_path / "f", per_class=4)
    res, cache = tmp_path / "res", tmp_path / "c"
    common = ["--datasets", str(folder), "--models", "lenet5", "--epochs", "1", "--results-dir",
              str(res), "--cache-dir", str(cache)]
    assert run(*common, "--image-size", "16") == 0
    kept = pair_files(res)
    assert kept
    capsys.readouterr()
    culprit = break_folder(folder, problem)
    resize = [] if problem in ("mixed sizes", "not square") else ["--image-size", "16"]
    assert run(*common, *resize, "--force") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and says in first and str(culprit) in first, first
    if problem in ("mixed sizes", "not square"):
        assert "--image-size" in first
    assert pair_files(res) == kept  # nothing already written is lost


def test_a_run_lists_its_folder_once_and_a_file_gone_since_is_one_line(tmp_path, capsys,
                                                                       monkeypatch):
    """Listing stats every file (seconds for CIFAR-10's 60,000): the plan's listing is the one
    the data is read with. A file removed after that listing is named in one line."""
    folder = own_folder(tmp_path / "f", per_class=4)
    listed = []
    real = cp.folder_listing
    monkeypatch.setattr(cp, "folder_listing", lambda *a: listed.append(a[0]) or real(*a))
    common = ["--datasets", str(folder), "--models", "lenet5", "--epochs", "1", "--image-size", "16"]
    assert run(*common, "--results-dir", str(tmp_path / "res"), "--cache-dir", str(tmp_path / "c")) == 0
    assert listed == [folder.resolve()]
    gone = sorted((folder / "blue_things").iterdir())[0]
    monkeypatch.setattr(cp, "folder_listing", lambda *a: (real(*a), gone.unlink())[0])
    capsys.readouterr()
    assert run(*common, "--results-dir", str(tmp_path / "res2"), "--cache-dir", str(tmp_path / "c2")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: {gone} could not be read"), err


def test_an_unknown_dataset_that_is_no_folder_exits_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cp.parse_args(["--datasets", str(tmp_path / "nowhere")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown dataset name" in err and "no such folder" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# CIFAR-10 from an image-folder copy
# ---------------------------------------------------------------------------------------------

def test_cifar10_reads_an_image_folder_copy_and_names_it(tmp_path, capsys):
    data_dir = tmp_path / "data"
    cifar_copy(data_dir / "CIFAR10-JPEG")
    res = tmp_path / "res"
    assert run("--datasets", "cifar10", "--models", "lenet5", "--epochs", "1", "--data-dir",
               str(data_dir), "--results-dir", str(res), "--cache-dir", str(tmp_path / "c")) == 0
    out = capsys.readouterr().out
    assert "CIFAR-10, JPEG q75 copy" in out
    r = cp.load_result(cp.result_path(res, "cifar10", "lenet5"))
    assert r["data"]["label"] == "CIFAR-10, JPEG q75 copy"
    assert r["data"]["source"]["path"] == str((data_dir / "CIFAR10-JPEG").resolve())
    assert r["data"]["source"]["files"] == 40 and r["test"]["n_images"] == 10
    assert r["config"]["data"].startswith("image folder ")
    assert cp.spec_of(r) == cp.DATASETS["cifar10"]  # the official classes, size and statistics
    with open(res / "cnn_summary.csv") as f:
        assert "CIFAR-10, JPEG q75 copy" in f.read()


def test_cifar10_copy_with_other_classes_is_refused(tmp_path, capsys):
    data_dir = tmp_path / "data"
    cifar_copy(data_dir / "cifar10")
    (data_dir / "cifar10" / "train" / "truck").rename(data_dir / "cifar10" / "train" / "lorry")
    (data_dir / "cifar10" / "test" / "truck").rename(data_dir / "cifar10" / "test" / "lorry")
    assert run("--datasets", "cifar10", "--models", "lenet5", "--epochs", "1", "--data-dir",
               str(data_dir), "--results-dir", str(tmp_path / "res"), "--cache-dir",
               str(tmp_path / "c")) == 1
    err = capsys.readouterr().err
    assert "is not a copy of CIFAR-10" in err and "lorry" in err


@pytest.mark.parametrize("quality", [30, 75, 95])
def test_jpeg_quality_is_read_from_the_quantisation_table(tmp_path, quality):
    path = save_image(tmp_path / "a.jpg", (32, 32), (90, 120, 150), np.random.default_rng(0),
                      quality=quality)
    with Image.open(path) as img:
        assert cp.jpeg_quality(img) == quality
    png = save_image(tmp_path / "a.png", (8, 8), (1, 2, 3), np.random.default_rng(0))
    with Image.open(png) as img:
        assert cp.jpeg_quality(img) is None


# ---------------------------------------------------------------------------------------------
# One budget rule, and precision by the CPU's capability
# ---------------------------------------------------------------------------------------------

def test_every_model_gets_the_same_epochs_on_a_dataset():
    for preset in cp.PRESETS:
        for dataset in (*cp.DATASETS, "my_own_folder"):
            epochs = {cp.budget(preset, dataset, m)[0] for m in cp.MODELS_REGISTRY}
            assert len(epochs) == 1, (preset, dataset, epochs)
    assert cp.budget("gpu", "cifar10", "vgg") == (30, 1.0)
    assert cp.budget("cpu", "mnist", "lenet5")[1] == 1.0 and cp.budget("cpu", "mnist", "vgg")[1] == 0.25


def test_the_table_states_the_budget_rule(tmp_path, capsys):
    data_dir = tmp_path / "data"
    cifar_copy(data_dir / "CIFAR10-JPEG", train=2)
    assert run("--datasets", "cifar10", "--models", "lenet5", "alexnet", "--epochs", "1", "--width",
               "0.125", "--data-dir", str(data_dir), "--results-dir", str(tmp_path / "res"),
               "--cache-dir", str(tmp_path / "c")) == 0
    out = capsys.readouterr().out
    results = cp.collect_runs(tmp_path / "res")
    assert f"\nCIFAR-10, JPEG q75 copy (cifar10): {cp.budget_note(results['cifar10'])}, 1 seed per " \
           "model\n" in out
    assert cp.budget_note(results["cifar10"]) == "1 epoch for every model"
    del results["cifar10"]["alexnet"][0]["config"]["budget_rule"]  # a record from before the rule
    assert cp.budget_note(results["cifar10"]) == "epochs per model (1), before the equal-epochs rule"


@pytest.mark.parametrize("avx512_bf16,amx,expected", [
    (False, False, ("no", "CPU without native bf16")), (True, False, ("bf16", "AVX-512 BF16")),
    (False, True, ("bf16", "AMX")), (True, True, ("bf16", "AVX-512 BF16 and AMX"))])
def test_auto_precision_on_a_cpu_follows_its_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    precision, why = cp.choose_precision("auto", on_cpu=True)
    assert precision == expected[0] and expected[1] in why
    assert cp.choose_precision("bf16", on_cpu=True)[0] == "bf16"  # as asked, whatever the CPU


def test_the_first_log_line_says_fp32_on_a_cpu_without_bf16(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    data_dir = tmp_path / "data"
    cifar_copy(data_dir / "CIFAR10-JPEG", train=2)
    assert run("--datasets", "cifar10", "--models", "lenet5", "--epochs", "1", "--data-dir",
               str(data_dir), "--results-dir", str(tmp_path / "res"), "--cache-dir",
               str(tmp_path / "c")) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("device cpu, precision no (CPU without native bf16")
    r = cp.load_result(cp.result_path(tmp_path / "res", "cifar10", "lenet5"))
    assert r["config"]["precision"] == "no"
