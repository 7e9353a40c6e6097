"""cnn_project.py against image folders assembled the way people assemble them (unzipped on a Mac,
exported from a phone, scanned, copied with links) and against hostile files: every case ends in a
completed run or one clear line naming the file or folder, never a traceback, and no earlier record
is lost. Also: one image-loading path, so a file gives the same pixels in training and in --predict."""

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnn_project as cp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("no_downloads")


def two_classes(root: Path, per_class: int = 5, size: int = 16) -> Path:
    """A small learnable folder: red things and blue things, PNG."""
    rng = np.random.default_rng(0)
    for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def run_cli(folder: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    """The real program in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "cnn_project.py"), "--datasets", str(folder),
                           "--models", "lenet5", "--epochs", "1", "--results-dir", str(results),
                           "--cache-dir", str(results / "cache"), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300)


def mac_zip_noise(folder: Path) -> None:
    """What unzipping on a Mac leaves: __MACOSX/ (a would-be class), ._ files, .DS_Store."""
    (folder / "__MACOSX" / "red").mkdir(parents=True)
    (folder / "__MACOSX" / "red" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "red" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "blue" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "README.txt").write_text("my photos")


def symlinked_class(folder: Path) -> None:
    """A class folder that is a symbolic link to a folder elsewhere."""
    target = two_classes(folder.parent / "elsewhere")
    (target / "red").rename(target / "green")
    os.symlink(target / "green", folder / "green")


COMPLETES = {  # kind: (how to make it, what the run prints)
    "mac zip": (mac_zip_noise, "skipped 5 entries that are not an image of a class folder"),
    "symlinked class": (symlinked_class, "3 classes"),
    "class of one image": (lambda f: [p.unlink() for p in sorted((f / "blue").iterdir())[1:]],
                           "too small to test, so no test image and no test score: blue (1 image)"),
}


@pytest.mark.parametrize("kind", list(COMPLETES))
def test_folder_noise_is_skipped_and_said_in_one_line(tmp_path, kind):
    folder = two_classes(tmp_path / "photos")
    make, says = COMPLETES[kind]
    make(folder)
    done = run_cli(folder, tmp_path / "res")
    assert done.returncode == 0, done.stderr
    assert says in done.stdout and "Traceback" not in done.stderr
    record = cp.load_result(cp.result_path(tmp_path / "res", "photos", "lenet5"))
    assert "__MACOSX" not in record["classes"] and record["status"] == "ok"


def big_png(path: Path) -> Path:
    """A PNG that declares far more pixels than Pillow's decompression-bomb limit."""
    side = int((Image.MAX_IMAGE_PIXELS * 2.5) ** 0.5)
    Image.new("1", (side, side)).save(path)  # 1 bit per pixel: a few kB on disk
    return path


def text_as_jpg(folder: Path) -> Path:
    """A text file with an image's name."""
    path = folder / "red" / "x.jpg"
    path.write_text("hello")
    return path


FAILS = {  # kind: (how to make it, returns the path to blame, words of the one line)
    "decompression bomb": (lambda f: big_png(f / "red" / "huge.png"), "too large to be a training"),
    "train without test": (lambda f: (f / "train").mkdir() or f, "has train/ but no test/"),
    "not an image": (text_as_jpg, "is not an image Pillow can read"),
}


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """A folder and its finished run, trained once for every hostile case (each works on a copy)."""
    root = tmp_path_factory.mktemp("trained")
    folder = two_classes(root / "photos")
    assert run_cli(folder, root / "res", "--image-size", "16").returncode == 0
    return root


@pytest.mark.parametrize("kind", list(FAILS))
def test_a_hostile_folder_is_one_line_and_earlier_records_stay(tmp_path, kind, trained_folder):
    shutil.copytree(trained_folder, tmp_path, dirs_exist_ok=True)
    folder, results = tmp_path / "photos", tmp_path / "res"
    record = cp.result_path(results, "photos", "lenet5")
    before = record.read_bytes()
    make, says = FAILS[kind]
    culprit = make(folder)
    done = run_cli(folder, results, "--image-size", "16", "--force")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line, = [l for l in done.stderr.splitlines() if l.startswith("error: ")][:1]
    assert says in line and str(culprit) in line, line
    assert record.read_bytes() == before  # nothing already written is lost


def test_a_dataset_folder_named_plots_trains_beside_the_plots(tmp_path):
    folder = two_classes(tmp_path / "plots")
    done = run_cli(folder, tmp_path / "res", "--image-size", "16")
    assert done.returncode == 0, done.stderr
    assert cp.result_path(tmp_path / "res", "plots_folder", "lenet5").is_file()
    assert (tmp_path / "res" / "cnn" / "plots" / "test_metrics.png").is_file()


# ---------------------------------------------------------------------------------------------
# One image-loading path: the same pixels in training and in --predict
# ---------------------------------------------------------------------------------------------

def odd_images(folder: Path) -> dict:
    """Files of the kinds phones, scanners and editors write, one per class folder entry."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    made = {}
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    made["exif rotated jpeg"] = folder / "a" / "phone.jpg"
    img.save(made["exif rotated jpeg"], exif=exif, quality=95)
    rgba = np.dstack([rgb, rng.integers(0, 256, (16, 16), dtype=np.uint8)])
    made["transparent png"] = folder / "a" / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(made["transparent png"])
    made["palette png"] = folder / "b" / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(made["palette png"])
    made["cmyk jpeg"] = folder / "b" / "print.jpg"
    Image.fromarray(rgb).convert("CMYK").save(made["cmyk jpeg"], quality=95)
    return made


@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / "odd"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    return folder, odd_images(folder)


def test_open_image_applies_exif_alpha_and_converts(odd_folder):
    _, made = odd_folder
    img, fmt = cp.open_image(made["exif rotated jpeg"].read_bytes(), "phone.jpg")
    assert fmt == "JPEG q95" and img.mode == "RGB" and img.size == (16, 16)
    stored = np.asarray(Image.open(made["exif rotated jpeg"]).convert("RGB"))
    assert np.array_equal(np.asarray(img), np.rot90(stored, -1))  # shown as the phone took it
    cut, _ = cp.open_image(made["transparent png"].read_bytes(), "cutout.png")
    rgba = np.asarray(Image.open(made["transparent png"])).astype(float)
    alpha = rgba[..., 3:] / 255
    expected = rgba[..., :3] * alpha + 255 * (1 - alpha)  # on white
    assert np.abs(np.asarray(cut).astype(float) - expected).max() <= 1
    for kind in ("palette png", "cmyk jpeg"):
        assert cp.open_image(made[kind].read_bytes(), kind)[0].mode == "RGB"


def test_sixteen_bit_grey_is_rescaled_not_saturated(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 0..65535
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)  # mode I;16
    img, _ = cp.open_image(path.read_bytes(), "scan.png")
    assert img.mode == "L" and np.array_equal(np.asarray(img), ramp // 257)


def test_a_decompression_bomb_is_one_line(tmp_path):
    path = big_png(tmp_path / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes either
        with pytest.raises(ValueError) as err:
            cp.open_image(path.read_bytes(), str(path))
    assert str(path) in str(err.value) and "too large" in str(err.value) and "\n" not in str(err.value)


def test_the_same_file_gives_the_same_tensor_in_training_and_predict(odd_folder):
    folder, made = odd_folder
    files = [(p, 0) for p in made.values()]
    trained = cp.decode_images(files, folder, 16, show_progress=False)["x"]
    spec = cp.dataclasses.replace(cp.image_folder_spec(str(folder)), in_channels=3, image_size=16)
    for i, path in enumerate(made.values()):
        assert torch.equal(cp.prepare_image(str(path), spec)[0], trained[i]), path.name
