"""benchmarks/restore_reference_weights.py: a committed record gets weights back only from a
retraining that reproduces its test predictions image by image.

Needs the real MNIST in ../shared/data (skips without it).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import cnn_project as cp
from test_cnn import SHARED_DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import restore_reference_weights as rw  # noqa: E402

pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                 reason="real MNIST not found in ../shared/data"),
              pytest.mark.usefixtures("no_downloads")]

TINY = ("--models", "lenet5", "--datasets", "mnist", "--epochs", "1", "--subset", "512",
        "--width", "0.125", "--no-progress", "--data-dir", str(SHARED_DATA))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same seeded pair trained twice, in two folders: a 'committed' run and a retraining."""
    runs = []
    for name in ("committed", "scratch"):
        folder = tmp_path_factory.mktemp(name)
        assert cp.main([*TINY, "--results-dir", str(folder)]) == 0
        runs.append(folder)
    return runs


@pytest.fixture
def committed_without_weights(two_runs, tmp_path):
    folder = tmp_path / "committed"
    shutil.copytree(two_runs[0], folder)
    weights = cp.weights_path(folder, "mnist", "lenet5")
    weights.unlink()
    record = cp.load_result(cp.result_path(folder, "mnist", "lenet5"))
    del record["confidence_threshold"]  # as in a committed record whose weights were never kept
    cp.save_pickle(record, cp.result_path(folder, "mnist", "lenet5"))
    return folder


def test_a_reproduced_pair_gets_the_retrained_weights_and_its_predict_rule(
        two_runs, committed_without_weights, capsys):
    folder, scratch = committed_without_weights, two_runs[1]
    assert rw.missing_pairs(folder) == {"mnist": ["lenet5"]}
    assert rw.restore(folder, scratch, rw.missing_pairs(folder)) == 1
    assert "512 test predictions identical" in capsys.readouterr().out
    weights = cp.weights_path(folder, "mnist", "lenet5")
    kept, trained = load_file(weights), load_file(cp.weights_path(scratch, "mnist", "lenet5"))
    assert kept.keys() == trained.keys() and all(torch.equal(kept[k], trained[k]) for k in kept)
    with safe_open(weights, "pt") as f:  # rebuilt as the committed record says
        assert f.metadata()["settings"] == json.dumps(cp.settings_of(
            cp.load_result(cp.result_path(folder, "mnist", "lenet5"))))
    record = cp.load_result(cp.result_path(folder, "mnist", "lenet5"))
    assert record["confidence_threshold"] and record["restored_weights"]["check"]
    assert rw.missing_pairs(folder) == {}
    net = cp.load_trained(folder, "mnist", "lenet5")  # --predict can rebuild it
    assert sum(p.numel() for p in net.parameters()) == record["params"]


def test_a_retraining_with_one_other_prediction_restores_nothing(
        two_runs, committed_without_weights, tmp_path, capsys):
    scratch = tmp_path / "scratch"
    shutil.copytree(two_runs[1], scratch)
    path = cp.result_path(scratch, "mnist", "lenet5")
    record = cp.load_result(path)
    predictions = np.array(record["test"]["predictions"])
    predictions[7] = (predictions[7] + 1) % 10
    record["test"]["predictions"] = predictions
    cp.save_pickle(record, path)
    before = cp.load_result(cp.result_path(committed_without_weights, "mnist", "lenet5"))
    assert rw.restore(committed_without_weights, scratch, rw.missing_pairs(committed_without_weights)) == 0
    assert "NOT restored: 1 of 512 test predictions differ" in capsys.readouterr().out
    assert not cp.weights_path(committed_without_weights, "mnist", "lenet5").exists()
    after = cp.load_result(cp.result_path(committed_without_weights, "mnist", "lenet5"))
    assert "restored_weights" not in after and after.keys() == before.keys()
