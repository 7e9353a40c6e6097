"""--inspect and --predict --explain: the Grad-CAM of every architecture has its input's size,
the expected calibration error matches a hand computation, a corruption at severity 0 leaves the
images as they are, the robustness verdicts pair the same corrupted images, a bad input (a record
without weights, weights of another run, a layer that cannot be hooked, one class) is one line and
the rest goes on, and a rerun draws from the cache. Small models trained for one epoch on a small
folder of red and blue things keep it fast."""

import shutil

import numpy as np
import pytest
import torch

import cnn_project as cp
from test_cnn_folders import two_classes  # a small learnable folder: red things and blue things

pytestmark = pytest.mark.usefixtures("no_downloads")
FIGURES = ("gradcam", "filters", "featuremaps", "calibration", "robustness", "per_class")


def inspect_args(results, *extra) -> list:
    return ["--inspect", "--results-dir", str(results), "--cache-dir", str(results / "cache"), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-5 and ResNet-18 (width 0.125) trained one epoch on a 40-image folder, and inspected."""
    root = tmp_path_factory.mktemp("inspect")
    folder = two_classes(root / "colours", per_class=20)
    results = root / "res"
    assert cp.main(["--datasets", str(folder), "--models", "lenet5", "resnet", "--epochs", "1",
                    "--width", "0.125", "--results-dir", str(results), "--cache-dir",
                    str(results / "cache"), "--no-progress"]) == 0
    assert cp.main(inspect_args(results)) == 0
    dataset = next(p.name for p in (results / "cnn").iterdir() if p.name not in cp.RESERVED_FOLDERS)
    return folder, results, dataset


def fresh_copy(trained, tmp_path):
    folder, results, dataset = trained
    shutil.copytree(results, tmp_path / "res")
    return tmp_path / "res", dataset


@pytest.mark.parametrize("name,channels,side", [(m, 3, 32) for m in cp.MODELS_REGISTRY]
                         + [("lenet5", 1, 28), ("xception", 1, 28)])  # 28 px: 7x7 maps, odd sides
def test_every_architectures_cam_has_its_inputs_size_and_its_stages_hook(name, channels, side):
    torch.manual_seed(0)
    spec = cp.DatasetSpec("t", None, "", (), channels, side, (0.5,) * channels, (0.25,) * channels, 0,
                          False, tuple("abc"))
    net = cp.build_model(name, channels, 3, 0.125, side).eval()
    x = torch.randint(0, 256, (2, channels, side, side), dtype=torch.uint8)
    cam = cp.explain(net, name, spec, x)
    assert cam["maps"].shape == (2, side, side)
    assert 0 <= cam["maps"].min() and cam["maps"].max() <= 1
    assert cp.CAM_LAYERS[name][0] in cam["layer"]
    stages = cp.stage_maps(net, name, spec, x[:1])
    assert [s[0] for s in stages] == [label for label, _ in cp.FEATURE_STAGES[name]]


def test_ece_matches_a_hand_computed_example():
    # 15 bins of width 1/15: 0.95 falls in [14/15, 1) with accuracy 1/2, 0.55 in [8/15, 9/15) with
    # accuracy 1, 0.25 in [3/15, 4/15) with accuracy 0; ECE = sum over bins of share * |acc - conf|
    confidence = [0.95, 0.95, 0.55, 0.55, 0.25]
    correct = [True, False, True, True, False]
    by_hand = 2 / 5 * abs(0.5 - 0.95) + 2 / 5 * abs(1 - 0.55) + 1 / 5 * abs(0 - 0.25)
    assert cp.expected_calibration_error(confidence, correct) == pytest.approx(by_hand, abs=1e-6)
    bins = cp.reliability_bins(confidence, correct)
    assert bins["count"].sum() == 5 and bins["count"][14] == 2 and bins["accuracy"][8] == 1
    share = bins["count"] / 5
    assert np.sum(share * np.abs(bins["accuracy"] - bins["confidence"])) == pytest.approx(by_hand)


def test_a_confidence_of_exactly_1_is_in_the_last_of_the_15_bins():
    # float16 records round a top-1 probability above 0.99976 to 1.0: it belongs in [14/15, 1], as
    # in the reliability diagram, not in a 16th bin of its own
    confidence, correct = np.array([1.0, 0.95], dtype=np.float16), [False, True]
    by_hand = abs(0.5 - (1.0 + float(np.float16(0.95))) / 2)
    assert cp.expected_calibration_error(confidence, correct) == pytest.approx(by_hand, abs=1e-6)
    bins = cp.reliability_bins(confidence, correct)
    assert np.sum(bins["count"] / 2 * np.abs(bins["accuracy"] - bins["confidence"])) == pytest.approx(by_hand)


def test_a_corruption_at_severity_0_is_the_identity_and_the_noise_is_seeded():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for kind in cp.CORRUPTIONS:
        assert torch.equal(cp.corrupt(x, kind, 0), x), kind
        worse = [cp.corrupt(x, kind, s) for s in (1, 2, 3)]
        assert all(w.shape == x.shape and w.dtype == torch.uint8 for w in worse), kind
        assert not torch.equal(worse[-1], x), kind
    assert torch.equal(cp.corrupt(x, "gaussian noise", 2), cp.corrupt(x, "gaussian noise", 2))
    assert not torch.equal(cp.corrupt(x, "gaussian noise", 2), cp.corrupt(x, "gaussian noise", 2, seed=1))


def test_robustness_verdicts_pair_the_same_corrupted_images():
    """B is A with 15 of A's right answers made wrong: 78.5% against 80% on 1000 images. Unpaired,
    that is noise; paired on the same images, all 15 disagreements go one way: 'worse'."""
    n, rng = 1000, np.random.default_rng(0)
    labels = rng.integers(0, 10, n)
    a = np.where(np.arange(n) < 800, labels, (labels + 1) % 10)
    b = a.copy()
    b[:15] = (labels[:15] + 1) % 10
    key = ("blur", 1)
    entries = {m: {"weights": {"corrupted": {key: p}, "subset_index": np.arange(n), "subset_y": labels}}
               for m, p in (("resnet", a), ("vgg", b))}
    by_model = {m: {0: {"test": {"predictions": labels}}} for m in entries}
    out = cp.robustness("d", entries, by_model, ["resnet", "vgg"])
    row = next(r for r in out["vgg"]["rows"] if r["severity"] == 1)
    assert (row["accuracy"], row["n_images"], row["against"]) == (0.785, n, "resnet")
    assert row["verdict"] == "worse, p < 0.05" and row["ci_high"] < 0
    assert out["resnet"]["verdicts"] == "the one compared with"
    assert "below the best in 1 of 1" == out["vgg"]["verdicts"]


def test_inspect_draws_every_figure_and_adds_ece_and_corruptions_to_the_csv(trained):
    folder, results, dataset = trained
    for kind in FIGURES:
        assert (results / "cnn" / "plots" / f"{kind}_{dataset}.png").stat().st_size > 0, kind
    import csv
    with open(results / "cnn_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(0 <= float(r["test_ece_mean"]) <= 1 and r["corrupted_accuracy"] for r in rows)
    with open(results / "cnn_robustness.csv") as f:
        corrupted = list(csv.DictReader(f))
    assert len(corrupted) == 2 * (1 + 3 * len(cp.CORRUPTIONS))
    assert not list(results.rglob("*.tmp"))


def test_a_rerun_draws_from_the_cache_and_clears_what_a_killed_one_left(trained, tmp_path, monkeypatch, capsys):
    results, dataset = fresh_copy(trained, tmp_path)
    calls = []
    monkeypatch.setattr(cp, "compute_pair", lambda *a: calls.append(a) or pytest.fail("recomputed"))
    monkeypatch.setattr(cp, "run_calibration", lambda *a: pytest.fail("recalibrated"))
    stale = cp.inspection_path(results, dataset, "lenet5").with_name("lenet5.pklab12cd34.tmp")
    stale.write_bytes(b"half a pickle")  # what a killed --inspect leaves
    assert cp.main(inspect_args(results)) == 0
    out = capsys.readouterr().out
    assert not calls and "note:" not in out
    assert not stale.exists() and "removed 1 temp file left half-written by a stopped run" in out


def one_note(capsys, results, *extra) -> str:
    capsys.readouterr()
    assert cp.main(inspect_args(results, *extra)) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")
             and "the corruptions are compared with" not in line]  # which model stands in for the best
    assert len(notes) == 1, notes
    assert not list(results.rglob("*.tmp"))
    return notes[0]


def test_a_record_without_weights_is_one_line_and_the_rest_goes_on(trained, tmp_path, capsys):
    results, dataset = fresh_copy(trained, tmp_path)
    cp.weights_path(results, dataset, "resnet").unlink()
    line = one_note(capsys, results)
    assert "no seed-0 weights for ResNet-18" in line
    assert (results / "cnn" / "plots" / f"gradcam_{dataset}.png").is_file()


def test_weights_of_another_run_are_one_line(trained, tmp_path, capsys):
    results, dataset = fresh_copy(trained, tmp_path)
    shutil.copy(cp.weights_path(results, dataset, "lenet5"), cp.weights_path(results, dataset, "resnet"))
    line = one_note(capsys, results)
    assert f"{dataset}/resnet" in line and "does not match its record's settings" in line
    assert "model lenet5 -> resnet" in line


def test_a_record_retrained_without_its_weights_is_one_line_even_with_a_cache(trained, tmp_path, capsys):
    results, dataset = fresh_copy(trained, tmp_path)  # inspected: the cache holds resnet's weights
    path = cp.result_path(results, dataset, "resnet")
    record = cp.load_result(path)
    record["config"]["epochs"] = 2  # retrained with other settings; the old weights file stayed
    cp.save_pickle(record, path)
    line = one_note(capsys, results)
    assert f"{dataset}/resnet" in line and "does not match its record's settings" in line
    assert cp.read_inspection(results, dataset, "resnet")["weights"] is None


def test_a_layer_that_cannot_be_hooked_is_one_line(trained, tmp_path, capsys, monkeypatch):
    results, dataset = fresh_copy(trained, tmp_path)
    monkeypatch.setitem(cp.CAM_LAYERS, "lenet5", ("features.99", "no such layer"))
    line = one_note(capsys, results)
    assert "lenet5 has no layer 'features.99'" in line and "cam figure leaves it out" in line
    found = cp.read_inspection(results, dataset, "lenet5")["weights"]
    assert found["cam"] is None and found["corrupted"]  # the corruptions still ran


def test_a_dataset_of_one_class_is_one_line(trained, tmp_path, capsys):
    results, dataset = fresh_copy(trained, tmp_path)
    runs = cp.collect_runs(results)
    for record in cp.records_of(runs[dataset]):
        record["data"]["spec"]["classes"] = ["red"]
    args = cp.parse_args(inspect_args(results))
    capsys.readouterr()
    assert cp.inspect_dataset(args, dataset, runs[dataset], cp.summarize(runs)[dataset], None) == []
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0 and "one class" in out


def test_predict_explain_saves_the_grad_cam_of_the_answer(trained, tmp_path, capsys):
    folder, results, dataset = trained
    picture = next((folder / "red").iterdir())
    capsys.readouterr()
    assert cp.main(["--predict", str(picture), "--dataset", str(folder), "--results-dir", str(results),
                    "--models", "lenet5", "--explain"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "Grad-CAM:" in l)
    saved = line.split("Grad-CAM: ")[1]
    assert saved.endswith(".png") and (tmp_path / saved).is_file()
    twin = tmp_path / "elsewhere" / picture.name  # the same name, another picture: its own file
    twin.parent.mkdir()
    twin.write_bytes(next((folder / "blue").iterdir()).read_bytes())
    assert cp.main(["--predict", str(twin), "--dataset", str(folder), "--results-dir", str(results),
                    "--models", "lenet5", "--explain"]) == 0
    other = next(l for l in capsys.readouterr().out.splitlines() if "Grad-CAM:" in l).split("Grad-CAM: ")[1]
    assert other != saved and (tmp_path / saved).is_file() and (tmp_path / other).is_file()


@pytest.mark.parametrize("argv,named", [(["--explain"], ["--explain", "--predict"]),
                                        (["--inspect", "--epochs", "2"], ["--inspect", "--epochs"]),
                                        (["--inspect", "--report"], ["--report", "--inspect"])])
def test_inspect_and_explain_refuse_flags_they_would_ignore(capsys, argv, named):
    with pytest.raises(SystemExit):
        cp.main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in named), err


def test_the_docs_state_the_layers_severities_and_subset_the_code_uses():
    text = (cp.Path(cp.__file__).parent / "docs" / "cnn_project.md").read_text()
    section = text.split("### Inside the networks")[1].split("\n### ")[0]
    for model, (path, _) in cp.CAM_LAYERS.items():
        row = next(line for line in section.splitlines()
                   if line.startswith(f"| {cp.MODELS_REGISTRY[model][0]} |"))
        assert f"(`{path}`)" in row, row
    levels = [line.strip() for line in section.splitlines() if line.strip().startswith("| ")]
    for kind, values in cp.CORRUPTIONS.items():
        shown = ", ".join(f"{v:g}" if v != 1.0 else "1.0" for v in values)
        assert any(line.endswith(f"| {shown} |") for line in levels), (kind, shown)
    assert f"{cp.CORRUPTION_IMAGES:,} test images" in section and f"{cp.ECE_BINS} bins" in section
    assert f"± {100 * 1.96 * (0.25 / cp.CORRUPTION_IMAGES) ** 0.5:.1f} points" in section
    smoothing = cp.RECIPE["label_smoothing"]
    assert f"label smoothing {smoothing:g}" in section and f"{1 - smoothing + smoothing / 10:.0%}" in section
