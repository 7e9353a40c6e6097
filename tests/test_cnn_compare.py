"""Tests of cnn_project.py's comparison over seeds: the spread, the paired tests and verdicts on
constructed predictions whose answer is known, the still-improving flag, --seeds and its record
layout on a tiny real run, and --predict's low-confidence rule (on the committed reference weights:
noise and a blank image must not come out as a confident class)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import cnn_project as cp

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
REFERENCE = ROOT / "results" / "reference_cpu"
pytestmark = pytest.mark.usefixtures("no_downloads")


# ---------------------------------------------------------------------------------------------
# The statistics, on constructed predictions
# ---------------------------------------------------------------------------------------------

def test_mcnemar_identical_predictions_give_p_1():
    right = np.random.default_rng(0).random(10_000) < 0.8
    assert cp.mcnemar_exact(right, right.copy()) == {"only_a": 0, "only_b": 0, "p_value": 1.0}


def test_mcnemar_200_more_right_images_give_p_below_1e_6():
    b = np.random.default_rng(1).random(10_000) < 0.8
    a = b.copy()
    a[np.flatnonzero(~b)[:200]] = True  # a is also right on 200 images b gets wrong
    test = cp.mcnemar_exact(a, b)
    assert test["only_a"] == 200 and test["only_b"] == 0 and test["p_value"] < 1e-6
    assert cp.mcnemar_exact(b, a)["p_value"] == test["p_value"]  # two-sided


def test_mcnemar_balanced_disagreement_is_not_significant():
    a = np.zeros(1000, bool)
    b = np.zeros(1000, bool)
    a[:50], b[50:100] = True, True  # each right where the other is wrong, 50 times
    assert cp.mcnemar_exact(a, b)["p_value"] == 1.0
    with pytest.raises(ValueError):
        cp.mcnemar_exact(a, b[:10])


def test_paired_bootstrap_interval():
    assert cp.paired_bootstrap_ci(np.zeros(10_000)) == (0.0, 0.0)
    better = np.zeros(10_000)
    better[:200] = 1.0  # right on 200 more of 10,000 images: +2 points
    low, high = cp.paired_bootstrap_ci(better)
    assert 0 < low < 0.02 < high < 0.03
    noise = np.random.default_rng(2).choice([-1.0, 0.0, 1.0], size=10_000, p=[0.05, 0.9, 0.05])
    low, high = cp.paired_bootstrap_ci(noise)
    assert low < noise.mean() < high and low < 0 < high  # symmetric noise: 0 inside


@pytest.mark.parametrize("val,expected", [([0.5, 0.6, 0.7], True), ([0.5, 0.7, 0.6], False),
                                          ([0.7, 0.7], False), ([0.9], False)])
def test_still_improving_means_the_last_epoch_set_the_best(val, expected):
    assert cp.still_improving({"val_accuracy": val}) is expected


def fake_record(model: str, seed: int, val: float, right: np.ndarray, labels: np.ndarray) -> dict:
    """A finished record with only what the comparison reads: right[i] says whether test image i
    was classified correctly."""
    predictions = np.where(right, labels, (labels + 1) % 10).astype(np.int8)
    acc = float(right.mean())
    return {"format": cp.RESULTS_FORMAT, "model": model, "model_display_name": model.upper(),
            "dataset": "mnist", "status": "ok", "failure_reason": None, "params": 1000,
            "macs_per_image": 10, "train_flops": 1e9, "train_time_s": 10.0, "throughput_img_s": 100.0,
            "time_to_target_s": None, "best_epoch": 3, "best_val_accuracy": val,
            "history": {"epoch": [1, 2, 3], "val_accuracy": [val - 0.02, val - 0.01, val]},
            "config": {"seed": seed}, "classes": [str(i) for i in range(10)],
            "test": {"accuracy": acc, "precision": acc, "recall": acc, "f1": acc,
                     "labels": labels.astype(np.int8), "predictions": predictions}}


@pytest.fixture(scope="module")
def constructed():
    """Four models, three seeds, the same 10,000 test images. 'best' is chosen on validation;
    'same' predicts exactly like it; 'worse' misses 300 more images; 'sharp' is right on 300 more
    but validates lower (so it must not be chosen: the test set only reports)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 10_000)
    runs = {}
    for seed in range(3):
        base = rng.random(10_000) < 0.9
        worse, sharp = base.copy(), base.copy()
        worse[np.flatnonzero(base)[:300]] = False
        sharp[np.flatnonzero(~base)[:300]] = True
        for model, val, right in (("best", 0.95, base), ("same", 0.94, base), ("worse", 0.90, worse),
                                  ("sharp", 0.93, sharp)):
            runs.setdefault(model, {})[seed] = fake_record(model, seed, val, right.copy(), labels)
    return {"mnist": runs}


def test_verdicts_on_constructed_runs(constructed):
    summary = cp.summarize(constructed)["mnist"]
    pairs = summary["pairs"]
    assert summary["best"] == "best"  # chosen by mean validation accuracy, not by test
    assert pairs["best"]["verdict"] == "best on validation"
    assert pairs["same"]["verdict"] == "tied with the best within noise"
    assert pairs["same"]["p_values"] == [1.0, 1.0, 1.0] and pairs["same"]["difference"] == 0
    assert pairs["worse"]["verdict"] == "worse, p < 0.05" and pairs["worse"]["p_max"] < 1e-6
    assert pairs["worse"]["ci_high"] < 0 and abs(pairs["worse"]["difference"] + 0.03) < 1e-9
    assert pairs["sharp"]["verdict"] == "better on test, p < 0.05" and pairs["sharp"]["ci_low"] > 0
    assert cp.tied_group(summary) == ["best", "same"]


def test_spread_over_seeds_is_mean_std_min_max(constructed):
    pair = cp.summarize(constructed)["mnist"]["pairs"]["worse"]
    acc = [r["test"]["accuracy"] for r in constructed["mnist"]["worse"].values()]
    assert pair["seeds"] == [0, 1, 2] and pair["n_seeds"] == 3 and pair["epochs"] == [3]
    assert pair["test_accuracy_mean"] == pytest.approx(np.mean(acc))
    assert pair["test_accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
    assert (pair["test_accuracy_min"], pair["test_accuracy_max"]) == (min(acc), max(acc))
    assert pair["still_improving"] == 3


def test_the_table_names_the_tied_group_not_a_single_winner(constructed, capsys):
    cp.print_table(constructed, cp.summarize(constructed))
    out = capsys.readouterr().out
    assert "tied with it within noise: SAME: the test set does not separate these" in out
    assert "worse than it (p < 0.05 in every seed): WORSE" in out
    assert "still improving: 12 of 12 runs" in out and "could change with more training" in out


def test_the_compact_table_says_each_verdict_in_words_within_100_characters(constructed, capsys):
    cp.print_compact_table(constructed, cp.summarize(constructed))
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line) <= cp.WIDE for line in lines), max(lines, key=len)
    rows = {line.split()[0]: line for line in lines if "±" in line and line.split()[0].isupper()}
    assert {m: " ".join(line.split()[4:-3]) for m, line in rows.items()} == {
        "BEST": "best on validation", "SAME": "tied with the best", "WORSE": "below the best",
        "SHARP": "above the best"}
    assert "BEST is best on validation; SAME is tied with it" in "\n".join(lines)


def test_seconds_from_different_hardware_are_never_averaged(constructed, capsys):
    """Seed 0 on the CPU, seeds 1 and 2 on a GPU (10x faster here): time and throughput are seed
    0's alone, the note names each hardware with its seeds, and accuracy still uses every seed."""
    runs = {"mnist": {m: {s: dict(r, config={"seed": s, "device": "cuda:0" if s else "cpu"},
                              versions={"gpu": "NVIDIA H200" if s else None},
                              train_time_s=1.0 if s else 10.0, throughput_img_s=1000.0 if s else 100.0)
                          for s, r in by_seed.items()} for m, by_seed in constructed["mnist"].items()}}
    pair = cp.summarize(runs)["mnist"]["pairs"]["worse"]
    assert pair["timed_on"] == "CPU" and pair["n_seeds"] == 3
    assert (pair["train_time_s_mean"], pair["throughput_img_s_mean"]) == (10.0, 100.0)
    assert cp.mixed_settings(runs) == {"mnist": "hardware (CPU: seed 0; NVIDIA H200: seeds 1, 2)"}
    cp.print_table(runs, cp.summarize(runs))
    out = capsys.readouterr().out
    assert "different hardware (CPU: seed 0; NVIDIA H200: seeds 1, 2): compare with care" in out
    assert "the hardware of each model's lowest seed (CPU)" in out
    same = cp.summarize(constructed)["mnist"]["pairs"]["worse"]  # one machine: every seed counts
    assert same["timed_on"] == "CPU" and cp.mixed_settings(constructed) == {}


def test_predict_uses_the_best_model_that_kept_weights(tmp_path, capsys):
    """--predict without --model: the best on validation, or, when its weights are not there, the
    next best that has them, with one line saying so."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 10, 100)
    folder = tmp_path / "cnn" / "mnist"
    folder.mkdir(parents=True)
    for model, val in (("resnet", 0.99), ("vgg", 0.98), ("lenet5", 0.97)):
        for seed in (0, 1):
            record = fake_record(model, seed, val, rng.random(100) < 0.9, labels)
            record["weights"] = f"{model}{'' if seed == 0 else f'.seed{seed}'}.safetensors"
            cp.save_pickle(record, cp.result_path(tmp_path, "mnist", model, seed))
    (folder / "vgg.seed1.safetensors").write_bytes(b"kept")  # only vgg's seed 1 kept weights
    model, seed, record = cp.predict_run(tmp_path, "mnist", list(cp.MODELS_REGISTRY))
    assert (model, seed, record["model"]) == ("vgg", 1, "vgg")
    assert "note: ResNet-18, the best on validation, kept no weights" in capsys.readouterr().out
    (folder / "resnet.safetensors").write_bytes(b"kept")
    assert cp.predict_run(tmp_path, "mnist", list(cp.MODELS_REGISTRY))[:2] == ("resnet", 0)
    assert capsys.readouterr().out == ""
    assert cp.predict_run(tmp_path, "mnist", ["lenet5"])[:2] == ("lenet5", 0)  # named: as asked


def test_a_record_without_test_labels_is_not_compared(constructed):
    runs = {"mnist": {m: {s: dict(r, test={k: v for k, v in r["test"].items() if k != "labels"})
                          for s, r in by_seed.items()} for m, by_seed in constructed["mnist"].items()}}
    pairs = cp.summarize(runs)["mnist"]["pairs"]
    assert pairs["worse"]["verdict"].startswith("not compared")


# ---------------------------------------------------------------------------------------------
# --seeds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,seeds", [([], [0]), (["--seed", "4"], [4]), (["--seeds", "3"], [0, 1, 2]),
                                        (["--seeds", "5", "1"], [1, 5])])
def test_seeds_flag(argv, seeds):
    assert cp.parse_args(argv).seed_list == seeds


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--seeds", "-1", "2"], ["--seed", "1", "--seeds", "2"]])
def test_bad_seeds_exit_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        cp.parse_args(argv)
    assert stop.value.code == 2 and "seed" in capsys.readouterr().err.splitlines()[-1]


def test_two_seeds_keep_their_own_records_resume_and_report_the_spread(tmp_path, capsys):
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST not found in ../shared/data")
    base = ["--models", "lenet5", "--datasets", "mnist", "--epochs", "1", "--subset", "512",
            "--data-dir", str(SHARED_DATA), "--results-dir", str(tmp_path), "--no-progress"]
    args = base + ["--seeds", "2"]
    assert cp.main(args) == 0
    out = capsys.readouterr().out
    assert "[run 2/2] mnist/lenet5 seed 1" in out
    first, second = (cp.result_path(tmp_path, "mnist", "lenet5", s) for s in (0, 1))
    assert first.name == "lenet5.pkl" and second.name == "lenet5.seed1.pkl"
    a, b = cp.load_result(first), cp.load_result(second)
    assert (a["config"]["seed"], b["config"]["seed"]) == (0, 1)
    assert not np.array_equal(a["test"]["predictions"], b["test"]["predictions"])  # other weights
    assert np.array_equal(a["test"]["labels"], b["test"]["labels"])  # the same test images
    assert cp.weights_path(tmp_path, "mnist", "lenet5", 1).is_file()
    assert cp.main(args) == 0 and capsys.readouterr().out.count("skipped (--force retrains)") == 2
    with open(tmp_path / "cnn_summary.csv") as f:
        row, = csv.DictReader(f)
    acc = [a["test"]["accuracy"], b["test"]["accuracy"]]
    assert row["n_seeds"] == "2" and row["seeds"] == "0 1" and row["verdict"] == "best on validation"
    assert float(row["test_accuracy_std"]) == pytest.approx(np.std(acc, ddof=1), rel=1e-5)
    with open(tmp_path / "cnn_runs.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f)] == ["0", "1"]
    assert cp.main(base + ["--seed", "1"]) == 0  # one seed: its record is found
    assert "finished earlier" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# --predict: top-k and a low-confidence rule chosen on validation data
# ---------------------------------------------------------------------------------------------

def test_confidence_verdict_rule():
    rule = {"rule": "max softmax probability", "quantile": 0.05, "target_accuracy": 0.95,
            "typical": 0.6, "reliable": 0.8, "threshold": 0.8, "n_images": 5000,
            "input_range": {"pixel spread": [20.0, 90.0], "pixel-to-pixel variation": [5.0, 28.0]}}
    usual = {"pixel spread": 50.0, "pixel-to-pixel variation": 12.0}
    sure = cp.confidence_verdict(0.85, rule, usual)
    assert sure.startswith("confident (top probability at or above 80.0%") and "right 95%" in sure
    low = cp.confidence_verdict(0.79, rule, usual)
    assert low.startswith("LOW CONFIDENCE: top probability below 80.0%")
    blank = cp.confidence_verdict(0.99, rule, dict(usual, **{"pixel spread": 0.0}))
    assert blank.startswith("LOW CONFIDENCE: the image does not look like the training images")
    noisy = cp.confidence_verdict(0.99, rule, dict(usual, **{"pixel-to-pixel variation": 85.0}))
    assert "pixel-to-pixel variation is 85.0, outside the 5.0-28.0" in noisy
    assert cp.confidence_verdict(0.99, None).startswith("confidence not judged")


def test_image_statistics_separate_blank_noise_and_a_digit():
    blank = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    digit = blank.clone()
    digit[0, 0, 6:22, 12:16] = 255  # a "1"
    stats = {name: cp.image_statistics(x) for name, x in (("blank", blank), ("noise", noise), ("digit", digit))}
    assert stats["blank"]["pixel spread"][0] == 0
    assert stats["noise"]["pixel-to-pixel variation"][0] > 60 > stats["digit"]["pixel-to-pixel variation"][0] > 5


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_predict_on_noise_and_blank_is_not_confident_with_the_reference_weights(dataset, tmp_path, capsys):
    """The committed best models, as a new user calls them: a blank image and uniform noise come out
    as LOW CONFIDENCE, and real test images mostly as confident."""
    from PIL import Image
    rng = np.random.default_rng(0)
    mode, channels = ("L", 1) if dataset == "mnist" else ("RGB", 3)
    shape = (64, 64) if channels == 1 else (64, 64, 3)
    images = {"blank_white": Image.new(mode, (64, 64), "white"), "blank_black": Image.new(mode, (64, 64), "black"),
              "noise": Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)}
    paths = []
    for name, img in images.items():
        paths.append(tmp_path / f"{name}.png")
        img.save(paths[-1])
    out = cp.predict(cp.parse_args(["--predict", *map(str, paths), "--dataset", dataset,
                                    "--results-dir", str(REFERENCE)]))
    for path, top, verdict in out:
        assert len(top) == 3 and verdict.startswith("LOW CONFIDENCE"), (path, top, verdict)
    assert capsys.readouterr().out.count("LOW CONFIDENCE") == 3
