"""benchmarks/cnn_benchmark.py on its tiny CI setting: every column present, no NaN, a chart.

Timing targets are read from the benchmark's own output (README), never asserted here.
"""

import csv
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cnn_benchmark as bench  # noqa: E402
import cnn_project as cp  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_throughput_table_is_complete(tmp_path):
    assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "cnn_throughput.csv")
    assert rows and set(rows[0]) == set(bench.CSV_COLUMNS)
    # 2 models x 2 shapes x (ours + naive), plus the seeds' 224 px pipeline for both models.
    seen = {(r["model"], r["input_shape"], r["pipeline"]) for r in rows}
    for model in ("lenet5", "resnet"):
        for shape in ("1x28x28", "3x32x32"):
            assert {(model, shape, "ours"), (model, shape, "naive")} <= seen
        assert (model, "3x224x224 (from 1x28x28)", "seeds") in seen
    for r in rows:
        for key in ("images_per_s", "ours_speedup", "train_gflop_per_image", "achieved_tflop_s",
                    "peak_tflop_s", "mfu"):
            value = float(r[key])
            assert math.isfinite(value) and value > 0, (key, r)
        if r["pipeline"] == "ours":
            assert float(r["ours_speedup"]) == 1.0
    # The seeds' LeNet-5 at 224 px costs far more FLOPs per image than ours at 28 px.
    flops = {(r["model"], r["pipeline"]): float(r["train_gflop_per_image"])
             for r in rows if r["input_shape"] != "3x32x32"}
    assert flops[("lenet5", "seeds")] > 50 * flops[("lenet5", "ours")]
    assert (tmp_path / "cnn_throughput.png").stat().st_size > 10_000


def test_flop_count_of_a_small_mlp_is_exact():
    import torch.nn as nn
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    forward = 2 * (12 * 5 + 5 * 3)
    # backward: both weight gradients, and the input gradient of the second layer only (the
    # images need no gradient), 2 FLOPs per multiply-add each.
    backward = 2 * (12 * 5 + 5 * 3) + 2 * 5 * 3
    assert cp.count_flops(model, (3, 2, 2), backward=True) == forward + backward


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not in ../shared/data")
def test_time_to_accuracy_row(tmp_path):
    assert bench.main(["--time-to-accuracy", "--data-dir", str(SHARED_DATA), "--tta-datasets", "mnist",
                       "--tta-model", "lenet5", "--tta-epochs", "1", "--tta-width", "0.5",
                       "--tta-batch-size", "64", "--tta-lr", "0.05", "--tta-seeds", "0", "1",
                       "--subset", "2048", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "cnn_time_to_accuracy.csv")
    assert [r["seed"] for r in rows] == ["0", "1"]
    for row in rows:
        assert row["dataset"] == "mnist" and row["model"] == "lenet5" and row["epochs_run"] == "1"
        assert row["batch_size"] == "64" and float(row["lr"]) == 0.05
        assert float(row["wall_seconds"]) >= float(row["train_seconds"]) > 0
        assert 0 <= float(row["test_accuracy"]) <= 1
        # 2,048 images for one epoch cannot reach 99.5%: the row says so instead of inventing a time.
        assert row["reached"] == "False" and row["train_seconds_to_target"] == "nan"


def test_depthwise_convolution_backward_counts_groups():
    import torch.nn as nn
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    forward = 2 * 5 * 5 * 4 * 1 * 9  # per image: output pixels x out channels x (in/groups) x 3x3
    # backward: the weight gradient only (the images need no gradient), as costly as the forward.
    assert cp.count_flops(conv, (4, 5, 5), backward=True) == 2 * forward


def test_auto_on_a_cpu_without_native_bf16_is_measured_as_fp32(tmp_path, monkeypatch):
    """The 'auto-no-bf16' variant fakes a CPU without AVX-512 BF16 or AMX: --precision auto must
    then train in fp32, the variant the benchmark compares it with (docs/benchmarks.md)."""
    monkeypatch.setattr(cp, "cpu_bf16_support", lambda: "AVX-512 BF16")  # whatever this CPU says
    assert bench.main(["--tiny", "--models", "lenet5", "--shapes", "3x32x32", "--pipelines",
                       "--variants", "ours", "auto-no-bf16", "fp32", "--out", str(tmp_path)]) == 0
    rows = {r["precision"]: r for r in read_csv(tmp_path / "cnn_throughput.csv")}
    assert set(rows) == {"bf16", "fp32 (auto, no native bf16)", "fp32"}
    assert cp.cpu_bf16_support() == "AVX-512 BF16"  # the fake is undone after the measurement
