"""Two-process data-parallel training of cnn_project.py through torchrun + accelerate on the CPU.

Launched with `python -m torch.distributed.run --standalone --nproc_per_node 2` (gloo backend); needs
the real MNIST in ../shared/data and skips without it.
"""

import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_cnn import HISTORY_KEYS, RECORD_KEYS, SHARED_DATA, TEST_KEYS, assert_plain

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                reason="real MNIST not found in ../shared/data")


def command(results_dir: Path, *extra: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "cnn_project.py"), "--models", "lenet5", "--datasets", "mnist",
           "--epochs", "2", "--subset", "8192", "--data-dir", str(SHARED_DATA),
           "--results-dir", str(results_dir), "--no-progress", *extra]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of their
    own, so killing its process group would leave them running). Linux /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(results_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(results_dir, *extra), capture_output=True, text=True, timeout=600,
                          env=ENV, cwd=ROOT)


def test_two_processes_train_once_write_once_and_resume(tmp_path):
    first = launch(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    assert "x 2 process(es)" in first.stdout
    # Only the main process prints and writes: one result line, one file, no temp files left.
    assert first.stdout.count("mnist/lenet5: ok") == 1, first.stdout
    path = tmp_path / "cnn" / "mnist" / "lenet5.pkl"
    assert sorted(p.name for p in (tmp_path / "cnn" / "mnist").iterdir()) == [
        "lenet5.pkl", "lenet5.safetensors"]
    assert not list(tmp_path.rglob("*.tmp"))
    with open(path, "rb") as f:
        record = pickle.load(f)
    assert_plain(record)
    assert RECORD_KEYS <= set(record) and HISTORY_KEYS == set(record["history"])
    assert TEST_KEYS == set(record["test"])
    assert record["config"]["num_processes"] == 2 and record["history"]["epoch"] == [1, 2]
    t = record["test"]
    # Every test image scored once, each process's share gathered back in order: a wrong order
    # or a lost gradient all-reduce would leave LeNet-5 near chance (10%).
    assert t["n_images"] == 8192 and t["confusion_matrix"].sum() == 8192
    assert math.isclose(t["accuracy"], np.trace(t["confusion_matrix"]) / 8192, rel_tol=1e-6)
    assert t["accuracy"] > 0.75, t  # 2 epochs on 8k images: about 85%; chance is 10%
    assert (tmp_path / "cnn_results.pkl").is_file() and (tmp_path / "cnn_summary.csv").is_file()

    # A resumed grid skips the finished pair on both processes and leaves the file untouched.
    mtime = path.stat().st_mtime_ns
    again = launch(tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "mnist/lenet5: finished earlier" in again.stdout
    assert "/ mnist epoch" not in again.stdout and "[pair" not in again.stdout  # nothing trained
    assert path.stat().st_mtime_ns == mtime

    # Other settings (3 epochs) train; SIGKILL the whole launch (torchrun and both workers) after
    # epoch 1, and the relaunch resumes from the main process's checkpoint on both processes.
    proc = subprocess.Popen(command(tmp_path, "--epochs", "3"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=ROOT,
                            start_new_session=True)
    for line in proc.stdout:
        if "epoch  1/3" in line:
            kill_tree(proc.pid)
            break
    proc.wait(timeout=60)
    assert (tmp_path / "cnn" / "mnist" / "lenet5.checkpoint.pt").is_file()
    resumed = launch(tmp_path, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stdout.count("resuming from the checkpoint after epoch") == 1, resumed.stdout
    assert "epoch  1/3" not in resumed.stdout and "epoch  3/3" in resumed.stdout
    with open(path, "rb") as f:
        record = pickle.load(f)
    assert record["history"]["epoch"] == [1, 2, 3] and record["test"]["accuracy"] > 0.75
    assert not (tmp_path / "cnn" / "mnist" / "lenet5.checkpoint.pt").exists()
    assert len(list((tmp_path / "cnn" / "mnist" / "superseded").glob("lenet5-*.pkl"))) == 1


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path):
    run = launch(tmp_path, "--batch-size", "255")
    assert run.returncode != 0
    assert "must be a multiple of the number of processes (2)" in run.stdout + run.stderr
