"""cnn_project.py's settings and where its answers and errors land: every numeric flag is checked
while the command line is parsed (one line naming the flag and its range, exit status 2, before any
data is read); flags the chosen mode would ignore are refused; --predict answers with each model
--models names and goes on past a file it cannot read; a confusion matrix of many classes is drawn
as its most-confused pairs, and a report draws a dataset's own figures again only when its records
changed; the last line of a failed run names the cause."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnn_project as cp
from test_cnn_folders import two_classes  # a small learnable folder: red things and blue things

pytestmark = pytest.mark.usefixtures("no_downloads")


def one_error_line(capsys, argv: list) -> str:
    """Run the program in-process on a command line it must refuse; return its one stderr line."""
    with pytest.raises(SystemExit) as stop:
        cp.main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    line, = err.splitlines()  # exactly one line: no usage block, no traceback
    assert line.startswith("error: ")
    return line


# ---------------------------------------------------------------------------------------------
# Every numeric flag: finite, in its range, named in one line
# ---------------------------------------------------------------------------------------------

BAD_NUMBERS = [("--width", "inf", "> 0 and <= 16"), ("--width", "nan", "> 0"), ("--width", "0", "> 0"),
               ("--width", "-0.5", "> 0"), ("--width", "17", "<= 16"), ("--width", "1e400", "> 0"),
               ("--lr", "nan", "> 0"), ("--lr", "0", "> 0"), ("--lr", "-0.1", "> 0"), ("--lr", "inf", "> 0"),
               ("--epochs", "0", ">= 1"), ("--epochs", "1.5", "whole number"), ("--epochs", "nan", ">= 1"),
               ("--batch-size", "0", ">= 1"), ("--subset", "0", ">= 8"), ("--subset", "7", ">= 8"),
               ("--image-size", "8", ">= 16"), ("--image-size", "4096", "<= 1024"),
               ("--seed", "-1", ">= 0"), ("--seed", str(2**32), f"<= {2**32 - 1}"),
               ("--seeds", "0", "count N from 1"), ("--seeds", "1001", "count N from 1 to 1000"),
               ("--seeds", "3 -1", ">= 0")]


@pytest.mark.parametrize("flag,value,accepted", BAD_NUMBERS, ids=lambda v: str(v))
def test_a_bad_number_is_one_line_naming_the_flag_and_its_range(capsys, flag, value, accepted):
    line = one_error_line(capsys, ["--models", "lenet5", "--datasets", "mnist", flag, *value.split()])
    assert flag in line and accepted in line, line


def test_the_ends_of_each_range_are_accepted_and_help_shows_the_ranges(capsys):
    args = cp.parse_args(["--width", "16", "--lr", "1e-6", "--subset", "8", "--seed", str(2**32 - 1),
                          "--epochs", "1", "--batch-size", "1"])
    assert (args.width, args.lr, args.subset, args.seed_list) == (16, 1e-6, 8, [2**32 - 1])
    assert cp.parse_args(["--seeds", "1000"]).seed_list == list(range(1000))
    with pytest.raises(SystemExit):
        cp.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("a number > 0 and <= 16", "peak one-cycle learning rate; a number > 0",
                  "a whole number >= 16 and <= 1024", "(default: 256)"):
        assert shown in text, shown


# ---------------------------------------------------------------------------------------------
# Flags the chosen mode would ignore are refused
# ---------------------------------------------------------------------------------------------

CONFLICTS = {
    "two modes": (["--report", "--predict", "x.png"], ["--report", "--predict"]),
    "training flags with --predict": (["--predict", "x.png", "--dataset", "mnist", "--epochs", "3",
                                       "--force"], ["--predict", "--epochs", "--force"]),
    "a seed with --predict": (["--predict", "x.png", "--dataset", "mnist", "--seeds", "2"],
                              ["--predict", "--seeds", "lowest seed"]),
    "a training flag with --report": (["--report", "--lr", "0.05"], ["--report", "--lr"]),
    "--full-table with --predict": (["--predict", "x.png", "--dataset", "mnist", "--full-table"],
                                    ["--predict", "--full-table"]),
    "a selection with --report": (["--report", "--datasets", "mnist"], ["--report", "--datasets"]),
    "--image-size without a folder": (["--datasets", "mnist", "--image-size", "32"], ["--image-size"]),
    "--no-flip without a folder": (["--datasets", "cifar10", "--no-flip"], ["--no-flip", "cifar10"]),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_a_flag_the_mode_would_ignore_is_refused_in_one_line(capsys, case):
    argv, named = CONFLICTS[case]
    line = one_error_line(capsys, argv)
    assert all(n in line for n in named), line


def test_a_default_value_given_again_is_no_conflict():
    args = cp.parse_args(["--report", "--lr", str(cp.RECIPE["lr"]), "--preset", "auto"])
    assert args.report and not args.models_named
    assert cp.parse_args(["--predict", "x.png", "--models", "vgg"]).models_named


# ---------------------------------------------------------------------------------------------
# --predict: each named model answers; a batch goes on past a file it cannot read
# ---------------------------------------------------------------------------------------------

def train_args(folder: Path, results: Path, *models: str) -> list:
    return ["--datasets", str(folder), "--models", *models, "--epochs", "1", "--width", "0.125",
            "--results-dir", str(results), "--cache-dir", str(results / "cache"), "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-5 and AlexNet trained one epoch on a 12-image folder (about a second each)."""
    root = tmp_path_factory.mktemp("flags")
    folder = two_classes(root / "colours", per_class=6)
    assert cp.main(train_args(folder, root / "res", "lenet5", "alexnet")) == 0
    return folder, root / "res"


def test_predict_answers_with_each_model_named(trained, tmp_path, capsys):
    folder, results = trained
    capsys.readouterr()
    picture = tmp_path / "mine.png"
    Image.new("RGB", (40, 30), (210, 30, 30)).save(picture)
    base = ["--predict", str(picture), "--dataset", str(folder), "--results-dir", str(results)]
    assert cp.main(base + ["--models", "alexnet", "lenet5"]) == 0
    out = capsys.readouterr().out.splitlines()
    headers = [l for l in out if " / " in l and ", seed 0 (" in l]
    assert [h.split(" / ")[1].split(",")[0] for h in headers] == ["AlexNet", "LeNet-5"]  # as named
    assert sum(l.startswith(f"{picture}: ") for l in out) == 2  # one answer per model
    assert cp.main(base + ["--models", "lenet5"]) == 0  # one model: one answer, as before
    assert sum(l.startswith(f"{picture}: ") for l in capsys.readouterr().out.splitlines()) == 1


def test_predict_with_a_model_not_trained_stops_before_any_answer(trained, tmp_path, capsys):
    folder, results = trained
    capsys.readouterr()
    picture = tmp_path / "mine.png"
    Image.new("RGB", (16, 16), (30, 30, 210)).save(picture)
    assert cp.main(["--predict", str(picture), "--dataset", str(folder), "--results-dir", str(results),
                    "--models", "lenet5", "vgg"]) == 1
    out, err = capsys.readouterr()
    assert not any(l.startswith(str(picture)) for l in out.splitlines())
    line, = err.splitlines()
    assert line.startswith("error: ") and "vgg" in line and "weights" in line


def test_a_predict_batch_goes_on_past_an_unreadable_file(trained, tmp_path, capsys):
    folder, results = trained
    capsys.readouterr()
    good = [tmp_path / "red.png", tmp_path / "blue.png"]
    Image.new("RGB", (16, 16), (210, 30, 30)).save(good[0])
    Image.new("RGB", (16, 16), (30, 30, 210)).save(good[1])
    missing, text = tmp_path / "gone.png", tmp_path / "notes.png"
    text.write_text("not a picture")
    batch = [good[0], missing, text, good[1]]
    assert cp.main(["--predict", *map(str, batch), "--dataset", str(folder), "--results-dir", str(results),
                    "--models", "lenet5"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert all(sum(l.startswith(f"{p}: ") for l in lines) == 1 for p in good)  # both answered
    assert [l for l in lines if l.startswith("not answered: ")] == [
        f"not answered: no such file: {missing}",
        f"not answered: {text} is not an image Pillow can read (UnidentifiedImageError)"]
    last, = err.splitlines()  # one line, at the end, naming the first file it could not read
    assert last.startswith("error: --predict: 2 of 4 images not answered") and str(missing) in last


# ---------------------------------------------------------------------------------------------
# Reports at scale
# ---------------------------------------------------------------------------------------------

def test_most_confused_pairs_are_the_largest_off_diagonal_cells():
    matrix = np.diag([50, 40, 30, 20])
    matrix[2, 0], matrix[0, 3], matrix[3, 1], matrix[1, 2] = 9, 7, 7, 1
    assert cp.most_confused_pairs(matrix, k=3) == [(2, 0, 9), (0, 3, 7), (3, 1, 7)]
    assert cp.most_confused_pairs(np.diag([5, 5])) == []


@pytest.mark.parametrize("n_classes", [40, 10])
def test_a_confusion_of_many_classes_is_drawn_as_its_most_confused_pairs(tmp_path, monkeypatch,
                                                                         n_classes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(0)
    matrix = np.diag(rng.integers(20, 40, n_classes)) + rng.integers(0, 3, (n_classes, n_classes))
    classes = [f"class {i}" for i in range(n_classes)]
    record = {"test": {"confusion_matrix": matrix, "accuracy": 0.5}, "classes": classes,
              "model_display_name": "LeNet-5", "config": {"seed": 0}, "dataset": "many",
              "data": {"label": "many things (image folder)"}}
    drawn, save = {}, cp._figure

    def keep(plt, path, fig):
        ax, = fig.axes
        drawn["images"], drawn["ticks"] = len(ax.images), [t.get_text() for t in ax.get_yticklabels()]
        return save(plt, path, fig)

    monkeypatch.setattr(cp, "_figure", keep)
    path = cp.plot_confusion(plt, "many", record, tmp_path)
    assert path.stat().st_size > 1000
    if n_classes <= cp.CONFUSION_MATRIX_MAX_CLASSES:
        assert drawn["images"] == 1 and len(drawn["ticks"]) == n_classes  # the matrix itself
        return
    pairs = cp.most_confused_pairs(matrix)
    assert drawn["images"] == 0 and len(pairs) == cp.CONFUSED_PAIRS == 20
    assert drawn["ticks"] == [f"{classes[i]} → {classes[j]}" for i, j, _ in pairs]


def test_a_report_draws_a_datasets_figures_again_only_when_its_records_change(trained, tmp_path):
    _, results = trained
    shutil.copytree(results / "cnn", tmp_path / "cnn")
    plots = tmp_path / "cnn" / "plots"
    dataset, = cp.collect_runs(tmp_path)
    own = [plots / f"{kind}_{dataset}.png" for kind in ("curves", "confusion", "misclassified")]
    stale = plots / f"confusion_{dataset}_old.png"
    stale.write_bytes(b"an old figure")
    for p in own + [plots / "test_metrics.png"]:
        os.utime(p, ns=(1, 1))  # drawn long before its records: drawn again
    cp.report(tmp_path)
    drawn = {p: p.stat().st_mtime_ns for p in own + [plots / "test_metrics.png"]}
    assert all(t > 1 for t in drawn.values()) and not stale.exists()
    cp.report(tmp_path)  # nothing changed: the dataset's own figures stay as they are
    assert all(p.stat().st_mtime_ns == drawn[p] for p in own)
    assert plots.joinpath("test_metrics.png").stat().st_mtime_ns > drawn[plots / "test_metrics.png"]
    record = cp.result_path(tmp_path, dataset, "lenet5")
    cp.save_pickle(cp.load_result(record), record)  # a record written again: drawn again
    cp.report(tmp_path)
    assert all(p.stat().st_mtime_ns > drawn[p] for p in own)


# ---------------------------------------------------------------------------------------------
# The last line of a failed run names its cause
# ---------------------------------------------------------------------------------------------

def test_the_last_line_of_a_failed_run_names_the_file_and_why(trained, tmp_path, capsys):
    """A trained folder (skipped: its record has these settings, so the report is printed) and a
    folder with a file that is not an image: the last line names that file, after the report."""
    folder, results = trained
    shutil.copytree(results, tmp_path / "res")
    bad = two_classes(tmp_path / "broken", per_class=3)
    (bad / "red" / "scan.png").write_text("not a picture")
    capsys.readouterr()
    argv = train_args(folder, tmp_path / "res", "lenet5", "alexnet")
    argv[argv.index("--datasets") + 1:argv.index("--datasets") + 1] = [str(bad)]
    assert cp.main(argv) == 1
    out, err = capsys.readouterr()
    assert "skipped" in out and "plots: " in out  # the report came between the cause and the end
    last = err.splitlines()[-1]
    assert last.startswith("error: not trained, dataset unavailable: ")
    assert str(bad / "red" / "scan.png") in last and "is not an image Pillow can read" in last
