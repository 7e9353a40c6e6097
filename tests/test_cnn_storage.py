"""Storage faults and runs that share a results folder, on the real program (cnn_project.py).

A write the disk refuses (no space, read-only, no permission) at each place the program writes (a
checkpoint, a weights file, a record, a plot, the summary table and pickle) ends in one line, with
no temp file or partial file left and every earlier file unchanged; a real read-only folder (a
read-only bind mount) and a real full disk (a small tmpfs) where this machine can mount them. Runs
that share a folder: a run another live process holds is skipped and said, what a stopped run left
is removed, and two real processes asked for the same pairs train each of them once.

Needs the real MNIST in ../shared/data (skips without it).
"""

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cnn_project as cp
from test_cnn import SHARED_DATA, cli

pytestmark = [pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(),
                                 reason="real MNIST not found in ../shared/data"),
              pytest.mark.usefixtures("no_downloads")]

TINY = ("--datasets", "mnist", "--epochs", "1", "--subset", "512", "--width", "0.125",
        "--no-progress", "--data-dir", str(SHARED_DATA))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A results folder with one finished run (mnist/lenet5, seed 0), its summaries and plots: the
    earlier files every fault must leave as they were."""
    results = tmp_path_factory.mktemp("trained")
    assert cp.main(["--models", "lenet5", *TINY, "--results-dir", str(results)]) == 0
    return results


@pytest.fixture
def folder(trained, tmp_path) -> Path:
    copy = tmp_path / "results"
    shutil.copytree(trained, copy)
    return copy


def contents(folder: Path) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refuse(monkeypatch, name: str, code: int) -> None:
    """Make the disk refuse the write of the file called `name` as a real one would: part of the
    bytes reach the temp file, then OSError(code) (other files are written as usual)."""
    real = cp._write_atomically

    def faulty(path, write, binary=True):
        if Path(path).name != name:
            return real(path, write, binary)

        def part_then_fail(f):
            f.write(b"\x00" * 100 if binary else "dataset,data\n")
            raise OSError(code, os.strerror(code))
        return real(path, part_then_fail, binary)
    monkeypatch.setattr(cp, "_write_atomically", faulty)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    line, = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: could not write "), line
    return line


# A file a run writes, the fault, and what the line must tell the learner to do.
FULL, READ_ONLY = "free some space there, or choose another --results-dir", "choose another --results-dir"
TRAINING_WRITES = [("lenet5.seed1.checkpoint.pt", errno.ENOSPC, FULL),
                   ("lenet5.seed1.safetensors", errno.EROFS, READ_ONLY),
                   ("lenet5.seed1.pkl", errno.EPERM, READ_ONLY)]


@pytest.mark.parametrize("name,code,todo", TRAINING_WRITES, ids=[n for n, _, _ in TRAINING_WRITES])
def test_a_refused_write_while_training_is_one_line_and_loses_nothing(folder, monkeypatch, capsys,
                                                                      name, code, todo):
    before = contents(folder)
    refuse(monkeypatch, name, code)
    argv = ["--models", "lenet5", "--seed", "1", *TINY, "--results-dir", str(folder)]
    assert cp.main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {folder / 'cnn' / 'mnist' / name}: ")
    assert os.strerror(code) in line and todo.capitalize() in line
    after = contents(folder)
    assert not [p for p in after if p.suffix in (".tmp", ".lock")], sorted(after)
    assert {p: after[p] for p in before} == before  # every earlier file as it was
    assert not cp.result_path(folder, "mnist", "lenet5", 1).exists()
    if name.endswith(".pkl"):  # the checkpoint is there: the same command resumes, nothing is lost
        monkeypatch.undo()
        assert cp.main(argv) == 0
        assert "resuming from the checkpoint after epoch 1" in capsys.readouterr().out
        assert cp.load_result(cp.result_path(folder, "mnist", "lenet5", 1))["status"] == "ok"


REPORT_WRITES = [("curves_mnist.png", errno.ENOSPC), ("cnn_results.pkl", errno.ENOSPC),
                 ("cnn_summary.csv", errno.EROFS), ("misclassified_mnist.png", errno.EACCES)]


@pytest.mark.parametrize("name,code", REPORT_WRITES, ids=[n for n, _ in REPORT_WRITES])
def test_a_refused_summary_or_plot_write_keeps_the_table_and_every_file(folder, monkeypatch,
                                                                        capsys, name, code):
    """A full disk while --report writes its files: the table, then one error line (status 1). A
    folder that cannot be written: the table and one note (status 0: a report only needs to read).
    Either way no temp file or partial plot, and the file that was refused keeps its old content."""
    for plot in (folder / "cnn" / "plots").glob("*_mnist.png"):  # older than the records: redrawn
        os.utime(plot, ns=(0, 0))
    before = contents(folder)
    refuse(monkeypatch, name, code)
    status = cp.main(["--report", "--results-dir", str(folder)])
    out, err = capsys.readouterr()
    assert "LeNet-5" in out and "best on validation" in out  # the table was printed
    if code == errno.ENOSPC:
        assert status == 1 and name in one_error_line(err) and FULL.capitalize() in err
    else:
        assert status == 0 and "Traceback" not in err
        note, = [line for line in err.splitlines() if line.strip()]
        assert note.startswith("note: the summary and plots were not refreshed: could not write in ")
    after = contents(folder)
    assert not [p for p in after if p.suffix in (".tmp", ".lock")], sorted(after)
    refused, = [p for p in before if p.name == name]
    assert after[refused] == before[refused]  # the old file, not a partial one
    assert {p: after[p] for p in before if p.suffix in (".pkl", ".safetensors")} == \
        {p: before[p] for p in before if p.suffix in (".pkl", ".safetensors")}


def test_a_fault_outside_the_results_folder_is_not_called_a_storage_fault(tmp_path):
    """Only a write the disk refused inside --results-dir becomes the storage line."""
    inside = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r" / "cnn" / "x.pkl"))
    outside = OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "data" / "x.png"))
    assert "could not write" in cp.storage_fault(inside, tmp_path / "r")
    assert cp.storage_fault(outside, tmp_path / "r") is None
    assert cp.storage_fault(FileNotFoundError(errno.ENOENT, "gone", "x"), tmp_path) is None


# ---------------------------------------------------------------------------------------------
# A real read-only folder and a real full disk, where this machine can mount them
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def mounted(target: Path, *steps):
    """Run `mount` with each of `steps` (argument lists) on `target`, and unmount it at the end;
    skip the test where mounting is not allowed (the faked faults above cover it)."""
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        for step in steps:
            run = subprocess.run(["mount", *step, str(target)], capture_output=True, text=True)
            if run.returncode:
                pytest.skip(f"cannot mount here ({run.stderr.strip() or run.returncode}); the faked "
                            f"OSError tests cover this fault")
            done += 1
        yield target
    finally:
        if done:
            subprocess.run(["umount", str(target)], capture_output=True)


def test_a_read_only_folder_still_reports_predicts_and_skips(folder, tmp_path, capsys):
    """On a read-only bind mount: --report prints the table and one note (status 0), --predict
    answers, a rerun whose runs are all finished skips them and notes the same; an unreadable
    record there is named and skipped, not moved; a run that has to train says in one line, before
    training, that the folder is read-only (status 1)."""
    image = tmp_path / "digit.png"
    from PIL import Image
    Image.new("L", (28, 28), 255).save(image)
    (folder / "cnn" / "mnist" / "alexnet.pkl").write_bytes(b"\x80\x04 truncated")
    note = "note: the summary and plots were not refreshed: could not write in "
    unreadable = "It could not be moved aside (Read-only file system): left as it is and skipped."
    with mounted(tmp_path / "ro", ["--bind", str(folder)], ["-o", "remount,bind,ro"]) as ro:
        before = contents(ro)
        assert cp.main(["--report", "--results-dir", str(ro)]) == 0
        out, err = capsys.readouterr()
        warning, line = err.strip().splitlines()
        assert "LeNet-5" in out and warning.endswith(unreadable) and line.startswith(note)
        assert cp.main(["--predict", str(image), "--dataset", "mnist", "--results-dir", str(ro)]) == 0
        assert f"{image}: " in capsys.readouterr().out
        assert cp.main(["--models", "lenet5", *TINY, "--results-dir", str(ro)]) == 0
        out, err = capsys.readouterr()
        assert "skipped" in out and err.strip().splitlines()[-1].startswith(note)
        assert "Traceback" not in err
        assert cp.main(["--models", "lenet5", "--seed", "1", *TINY, "--results-dir", str(ro)]) == 1
        out, err = capsys.readouterr()
        line = one_error_line(err)
        assert "read-only (Read-only file system)" in line and "epoch" not in out
        assert contents(ro) == before


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, capsys):
    """A real full disk (a 16 KiB tmpfs): the first checkpoint does not fit."""
    with mounted(tmp_path / "full", ["-t", "tmpfs", "-o", "size=16k", "tmpfs"]) as full:
        assert cp.main(["--models", "lenet5", *TINY, "--results-dir", str(full)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: could not write {full / 'cnn' / 'mnist' / 'lenet5.checkpoint.pt'}: "
                               f"the disk is full (No space left on device)")
        assert [p for p in full.rglob("*") if p.is_file()] == []


# ---------------------------------------------------------------------------------------------
# Runs that share a results folder
# ---------------------------------------------------------------------------------------------

def test_a_lock_is_held_until_its_process_ends_even_by_sigkill(tmp_path):
    lock = tmp_path / "lenet5.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); print('held', flush=True); "
         "time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with cp.file_lock(lock) as other:
        assert other == str(holder.pid)
    assert lock.exists()  # not ours to delete
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with cp.file_lock(lock) as other:
        assert other is None and lock.read_text().strip() == str(os.getpid())
        with cp.file_lock(lock) as second:  # another open file: as another process sees it
            assert second == str(os.getpid())
    assert not lock.exists()  # deleted by its holder on release


def test_a_run_another_live_run_holds_is_skipped_and_leftovers_of_stopped_runs_go(folder, capsys):
    """A run whose lock another live process holds is skipped (one line, and named at the end as
    not trained here, status 0), its temp file kept; the temp and lock files a stopped run left are
    removed and said."""
    mnist = folder / "cnn" / "mnist"
    before = contents(folder)
    live_temp = mnist / "lenet5.seed1.checkpoint.ptabcd1234.tmp"  # being written by the live run
    stopped = [mnist / "lenet5.pklwxyz9876.tmp", folder / "cnn_results.pklx1y2z3w4.tmp"]
    for path in (live_temp, *stopped):
        path.write_bytes(b"half a file")
    (mnist / "lenet5.lock").write_text("999999999\n")  # its process is gone: no lock on it
    with open(mnist / "lenet5.seed1.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        assert cp.main(["--models", "lenet5", "--seeds", "0", "1", *TINY,
                        "--results-dir", str(folder)]) == 0
        out, err = capsys.readouterr()
        assert live_temp.exists() and (mnist / "lenet5.seed1.lock").exists()
    assert "Traceback" not in err and "epoch  1/1" not in out
    assert "mnist/lenet5 seed 1: being trained by another run (pid 4242): skipped here" in out
    assert out.strip().splitlines()[-1].startswith(
        "not trained by this run: mnist/lenet5 seed 1: being trained by another run (pid 4242).")
    assert out.count("removed 1 temp file left half-written by a stopped run") == 2
    assert not any(p.exists() for p in stopped) and not (mnist / "lenet5.lock").exists()
    assert not cp.result_path(folder, "mnist", "lenet5", 1).exists()
    assert {p: b for p, b in contents(folder).items() if p.suffix in (".pkl", ".safetensors")} == \
        {p: b for p, b in before.items() if p.suffix in (".pkl", ".safetensors")}


def test_finished_since_tells_a_run_another_run_finished_meanwhile(trained):
    path = cp.result_path(trained, "mnist", "lenet5")
    settings = cp.settings_of(cp.load_result(path))
    assert cp.finished_since(path, settings, None)
    assert cp.finished_since(path, settings, path.stat().st_mtime)
    assert not cp.finished_since(path, settings, path.stat().st_mtime + 60)  # older than that
    assert not cp.finished_since(path, dict(settings, epochs=2), None)
    assert not cp.finished_since(path.with_name("alexnet.pkl"), settings, None)


def test_two_runs_in_one_folder_both_finish_and_train_each_run_once(tmp_path):
    """Two real processes started together, both asked for LeNet-5 and AlexNet on MNIST."""
    args = ("--models", "lenet5", "alexnet", *TINY[:-3])
    procs = [subprocess.Popen(cli(tmp_path, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    both = "".join(out for out, _ in outs)
    for name in ("LeNet-5", "AlexNet"):
        assert both.count(f"{name} / mnist epoch  1/1:") == 1, both
    for model in ("lenet5", "alexnet"):
        assert cp.load_result(cp.result_path(tmp_path, "mnist", model))["status"] == "ok"
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".tmp", ".lock")]
    assert not list(tmp_path.rglob("*.checkpoint.pt"))
