"""cnn_project.py against image folders assembled the way people assemble them (unzipped on a Mac,
exported from a phone, scanned, copied with links) and against hostile files: every case ends in a
completed run or one clear line naming the file or folder, never a traceback, and no earlier record
is lost. Also: one image-loading path, so a file gives the same pixels in training and in --predict."""

import os
import shutil
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnn_project as cp

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("no_downloads")


RED_AND_BLUE = (("red", (200, 40, 40)), ("blue", (40, 40, 200)))


def two_classes(root: Path, per_class: int = 5, size: int = 16, colours=RED_AND_BLUE) -> Path:
    """A small learnable folder: red things and blue things (or other (class, colour)s), PNG."""
    rng = np.random.default_rng(0)
    for name, colour in colours:
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


# ---------------------------------------------------------------------------------------------
# Folder discovery that cannot loop or merge: links followed once, one key per folder
# ---------------------------------------------------------------------------------------------

def test_a_looped_folder_trains_on_exactly_its_real_files(tmp_path):
    """A link back up the folder (a loop), a red file linked again under blue, and a git-annex
    file never fetched: the run trains on the 10 real files, one line naming each link."""
    folder = two_classes(tmp_path / "photos")
    os.symlink("..", folder / "red" / "loop")
    os.symlink("../red/0.png", folder / "blue" / "copy.png")
    os.symlink("../.git/annex/objects/Xk/Pz/SHA256E-s90--ab.png", folder / "blue" / "annexed.png")
    done = run_cli(folder, tmp_path / "res", "--image-size", "16")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    source = cp.load_result(cp.result_path(tmp_path / "res", "photos", "lenet5"))["data"]["source"]
    assert source["files"] == 10 and source["train_files"] + source["test_files"] == 10
    lines = done.stdout.splitlines()
    for says in ("red/loop -> ..", "blue/annexed.png -> ../.git/annex", "blue/copy.png (= red/0.png)"):
        assert sum(says in line for line in lines) == 1, says


def real_files(layout: dict) -> dict:
    """{split: [real path of each listed file]} of a folder_layout answer."""
    return {s: [os.path.realpath(p) for p, _ in layout[s] or []] for s in ("train", "test", "val")}


def test_links_are_followed_once_and_every_real_file_is_listed_once(tmp_path, capsys):
    folder = tmp_path / "f"
    for split in ("train", "test"):
        two_classes(folder / split, per_class=3)
    os.symlink("..", folder / "train" / "all")                     # a class folder that is the split
    os.symlink("../../train/red/0.png", folder / "test" / "red" / "seen.png")  # a train image in test
    outside = two_classes(tmp_path / "elsewhere", per_class=2)
    os.symlink(outside / "red", folder / "train" / "blue" / "more")  # followed: new images
    os.symlink(outside / "red", folder / "train" / "red" / "more")  # the same folder again: not
    os.symlink(tmp_path / "gone", folder / "train" / "green")          # a class link to nothing
    layout = cp.folder_layout(folder)
    assert layout["classes"] == ("blue", "red")
    files = real_files(layout)
    assert len(files["train"]) == 6 + 2 and len(files["test"]) == 6  # 3 + 3 each, and the linked 2
    assert len(set(files["train"] + files["test"])) == 14  # no file twice, none in both splits
    out = capsys.readouterr().out
    assert "train/all -> .." in out and "train/red/more -> " in out and "train/green -> " in out
    assert "test/red/seen.png (= train/red/0.png)" in out


def test_jfif_and_jpe_files_are_jpegs_in_training_too(tmp_path):
    folder = two_classes(tmp_path / "f", per_class=2)
    for name in ("web.jfif", "camera.jpe"):
        Image.new("RGB", (16, 16), (210, 30, 30)).save(folder / "red" / name, "JPEG")
    layout = cp.folder_layout(folder)
    assert {p.name for p, k in layout["train"] if k == 1} == {"0.png", "1.png", "web.jfif", "camera.jpe"}
    assert not layout["skipped"]
    decoded = cp.decode_images(layout["train"], folder, None, show_progress=False)
    assert decoded["formats"] == ["JPEG q75", "PNG"] and len(decoded["y"]) == 6


def test_a_class_name_in_nfc_and_nfd_is_one_class(tmp_path, capsys):
    nfc, nfd = (unicodedata.normalize(form, "café") for form in ("NFC", "NFD"))
    folder = two_classes(tmp_path / "f", per_class=2, colours=(("blue", (40, 40, 200)), (nfc, (90, 60, 30))))
    try:
        two_classes(tmp_path / "f", per_class=1, colours=((nfd, (90, 60, 30)),))
    except OSError:
        pytest.skip("this file system keeps one form of a name only")
    if len(list(folder.iterdir())) != 3:
        pytest.skip("this file system treats both forms as one name")
    layout = cp.folder_layout(folder)
    assert layout["classes"] == ("blue", nfc) and sum(k == 1 for _, k in layout["train"]) == 3
    assert "one name in different Unicode forms" in capsys.readouterr().out
    split = tmp_path / "s"  # train/ in NFC, test/ in NFD (copied from a Mac): the same classes
    two_classes(split / "train", per_class=2, colours=(("blue", (40, 40, 200)), (nfc, (90, 60, 30))))
    two_classes(split / "test", per_class=1, colours=(("blue", (40, 40, 200)), (nfd, (90, 60, 30))))
    layout = cp.folder_layout(split)
    assert layout["classes"] == ("blue", nfc) and sorted(k for _, k in layout["test"]) == [0, 1]


def test_a_name_that_is_not_utf8_is_read_and_named(tmp_path):
    folder = two_classes(tmp_path / "f", per_class=3)
    try:  # a class folder named in Latin-1 (b'gr\xfcn', 'grün'), a file in another encoding
        two_classes(folder, per_class=3, colours=((os.fsdecode(b"gr\xfcn"), (0, 200, 0)),))
        Image.new("RGB", (16, 16)).save(folder / "red" / os.fsdecode(b"\xff.png"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes UTF-8 names only")
    raw = cp.read_image_folder(folder, 16, 0, None, show_progress=False)
    assert raw["classes"] == ["blue", "gr\\xfcn", "red"] and raw["source"]["files"] == 10
    (folder / "red" / os.fsdecode(b"\xfe.png")).write_text("not a picture")
    with pytest.raises(cp.DatasetUnavailable) as err:
        cp.read_image_folder(folder, 16, 0, None, show_progress=False)
    assert "red/\\xfe.png is not an image" in str(err.value)
    str(err.value).encode("utf-8")  # prints on any terminal


def coloured(root: Path, *names: str) -> Path:
    """two_classes with these class names (each its own colour), so an answer shows its model."""
    return two_classes(root, colours=[(n, c) for n, c in zip(names, ((40, 200, 40), (220, 220, 30)))])


def test_two_folders_of_one_name_are_two_datasets_and_predict_answers_each(tmp_path, capsys):
    folders = {"a": two_classes(tmp_path / "a" / "photos"), "b": coloured(tmp_path / "b" / "photos", "fern", "sun"),
               "c": coloured(tmp_path / "c" / "Photos", "moss", "lemon")}
    res = tmp_path / "res"
    common = ["--models", "lenet5", "--epochs", "1", "--results-dir", str(res), "--cache-dir",
              str(tmp_path / "cache"), "--no-progress"]
    assert cp.main(["--datasets", str(folders["a"]), str(folders["b"]), *common]) == 0
    assert cp.main(["--datasets", str(folders["c"]), *common]) == 0  # another command, another case
    records = {p: p.read_bytes() for p in (res / "cnn").rglob("*.pkl")}
    assert len(records) == 3 and not list((res / "cnn").rglob("superseded"))
    assert cp.result_path(res, "photos", "lenet5") in records  # the first keeps its plain key
    picture = tmp_path / "picture.png"
    Image.new("RGB", (16, 16), (128, 128, 128)).save(picture)
    for folder in folders.values():
        answer, = cp.predict(cp.parse_args(["--predict", str(picture), "--dataset", str(folder),
                                            "--results-dir", str(res)]))
        assert {c for c, _ in answer[1]} == {p.name for p in folder.iterdir()}, folder
    capsys.readouterr()
    assert cp.main(["--datasets", str(folders["b"]), str(folders["c"]), str(folders["a"]), *common]) == 0
    assert capsys.readouterr().out.count("finished earlier with these settings") == 3
    assert {p: p.read_bytes() for p in (res / "cnn").rglob("*.pkl")} == records


def fake_record(res: Path, key: str, folder: Path) -> None:
    """A record in results key `key` that says it was made from `folder`."""
    cp.save_pickle({"format": cp.RESULTS_FORMAT, "data": {"source": {
        "kind": "image folder", "path": str(folder.resolve())}}}, cp.result_path(res, key, "lenet5"))


def test_a_folders_key_is_stable_and_its_own(tmp_path):
    res = tmp_path / "res"
    a, b = (tmp_path / d / "images" for d in "ab")
    for folder in (a, b):
        folder.mkdir(parents=True)

    def key(folder, taken=None):
        return cp.folder_key(cp.image_folder_spec(str(folder)), res, taken or {}).name
    assert key(a) == key(b) == "images"  # nothing holds the name yet
    assert key(b, {"images": str(a.resolve())}).startswith("images_")  # one command, two folders
    fake_record(res, "images", a)
    hashed = key(b)  # a later command: the name's key is a's
    assert hashed.startswith("images_") and key(b) == hashed and key(a) == "images"
    assert key(tmp_path / "b" / ".." / "b" / "images") == hashed  # the same folder by another path
    fake_record(res, hashed, b)
    moved = tmp_path / "c" / "images"
    moved.parent.mkdir()
    a.rename(moved)  # a moved: it keeps its records' key (its old place is gone), b keeps its own
    assert key(moved) == "images" and key(b) == hashed
    spec = cp.folder_key(cp.image_folder_spec(str(b)), res, {})
    assert spec.title == "b/images" and spec.folder == str(b.resolve())
