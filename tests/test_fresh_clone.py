"""Following the README in a fresh clone leaves `git status` clean: the programs write their own runs
(results/cnn/, results/cnn_*.csv/.pkl, results/seq2seq/, the downloaded data/, the app's
results/feedback.db) where .gitignore covers them, beside the committed runs, which they never touch;
and `--report` on a committed run rewrites its files as they are committed.

The README's commands run for real, made small (one epoch on a few hundred MNIST images from the
`shared/data` folder beside the checkout; a tiny seq2seq) in a new git repository holding the
programs, .gitignore and the committed GPU run. About 30 s."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SEQ2SEQ_TINY = ["--n-train", "200", "--n-val", "40", "--n-test", "40", "--max-len", "6", "--gen-max-len", "8",
                "--n-gen-per-len", "10", "--epochs", "1", "--hidden-size", "16", "--emb-dim", "8", "--device", "cpu"]


def git(repo: Path, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid",
                           "-c", "commit.gpgsign=false", *args], cwd=repo, capture_output=True, text=True,
                          check=True).stdout


def commit_new_repository(repo: Path, message: str) -> Path:
    """Make the files in `repo` a new git repository with one commit holding them all; returns `repo`."""
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", message]):
        git(repo, *args)
    return repo


def test_the_readme_commands_leave_git_status_clean(tmp_path):
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found in {SHARED_DATA}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "clone"
    repo.mkdir()
    for name in (".gitignore", "cnn_project.py", "seq2seq_project.py"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "results" / "reference_gpu", repo / "results" / "reference_gpu")
    commit_new_repository(repo, "a fresh clone")
    commands = [["seq2seq_project.py", *SEQ2SEQ_TINY],
                ["cnn_project.py", "--preset", "cpu", "--datasets", "mnist", "--models", "lenet5", "--epochs", "1",
                 "--subset", "500", "--data-dir", str(SHARED_DATA), "--no-progress"],
                ["cnn_project.py", "--report", "--results-dir", "results/reference_gpu"]]
    for args in commands:
        done = subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    for written in ("results/seq2seq/results.pkl", "results/cnn/mnist/lenet5.pkl", "results/cnn_summary.csv",
                    "results/cnn/plots/test_metrics.png"):
        assert (repo / written).is_file(), written  # the runs wrote where the README says
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    for later in ("data/MNIST/raw/train-images-idx3-ubyte", "results/feedback.db"):  # a download, the app
        assert git(repo, "check-ignore", later).strip() == later
