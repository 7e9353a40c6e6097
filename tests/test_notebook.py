"""colab.ipynb, executed top to bottom on this CPU the way a Colab user runs it, minus the cells tagged
`colab-only` (install, Drive, cloudflared's download): tiny settings through the NB_* variables its
`parameters` cell reads, the real MNIST from ../shared/data, results in a temp folder, a stand-in
`cloudflared` on PATH. Asserts on what the cells show: the precision line, the table, the figures, one
record opened with pickle, seq2seq's figures, the app's public-URL line in sharing mode, and the
training cell interrupted in the middle of a pair (as its stop button does) and run again: the finished
pair is skipped, the other resumes from its checkpoint. Nothing is downloaded."""

import asyncio
import copy
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab.ipynb"
SHARED_DATA = ROOT.parent / "shared" / "data"  # real MNIST in torchvision's layout, beside the checkout
MODELS = ["lenet5", "vgg"]
FAKE_URL = "https://notebook-test.trycloudflare.com"
INTERRUPT_AT = "VGG-16-BN / mnist epoch  1/2"
STOP_APP = """
import urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/_stcore/health", timeout=10) as reply:
    print("health", reply.status, reply.read().decode())
app.terminate()
print("app exit code", app.wait(timeout=60))
"""
SEQ2SEQ_TINY = ("--n-train 200 --n-val 40 --n-test 40 --max-len 6 --gen-max-len 8 --n-gen-per-len 10 "
                "--epochs 1 --hidden-size 16 --emb-dim 8 --device cpu")


def tags(cell) -> set:
    return set(cell.get("metadata", {}).get("tags", []))


def text_of(cell) -> str:
    """Everything the cell printed (streams and text results). Fails, with the cell's output and
    traceback, if the cell raised and was not tagged `raises-exception`."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    text = "".join(parts)
    errors = [o for o in cell.get("outputs", []) if o["output_type"] == "error"]
    if errors and "raises-exception" not in tags(cell):
        trace = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0]["traceback"]))
        raise AssertionError(f"cell {cell['id']} raised {errors[0]['ename']}:\n{text}\n{trace}")
    return text


def images_of(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def test_colab_only_cells_hold_everything_that_needs_colab():
    """The cells the suite skips are exactly the ones that need Colab (Drive, pip, the tunnel's
    download), and the parameters cell reads every NB_* variable the suite sets."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None  # committed clean
        needs_colab = re.search(r"google\.colab|pip\", \"install|git\", \"clone|urlretrieve", cell.source)
        assert bool(needs_colab) == ("colab-only" in tags(cell)), cell.source[:120]
    params = [c for c in nb.cells if "parameters" in tags(c)]
    assert len(params) == 1
    for var in ("NB_DATA_DIR", "NB_RESULTS_DIR", "NB_DATASETS", "NB_MODELS", "NB_EPOCHS", "NB_WIDTH",
                "NB_SUBSET", "NB_SEQ2SEQ_ARGS"):
        assert f'"{var}"' in params[0].source
    assert sum("train" in tags(c) for c in nb.cells) == 1
    # the defaults are the real run on Colab: results on Drive, datasets on the VM's disk
    assert '"/content/drive/MyDrive/' in params[0].source and '"/content/data"' in params[0].source
    assert "drive.flush_and_unmount()" in nb.cells[-1].source


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"real MNIST not found in {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("notebook")
    # A kernel of this very Python (the venv with the programs' requirements), whatever kernels
    # the machine has installed.
    spec = tmp / "jupyter" / "kernels" / "project-python"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "project python", "language": "python"}))
    # A stand-in for cloudflared: prints a quick tunnel's URL the way cloudflared logs it, then waits.
    fake_bin = tmp / "bin"
    fake_bin.mkdir()
    (fake_bin / "cloudflared").write_text(
        "#!/bin/sh\necho 'INF Requesting new quick Tunnel on trycloudflare.com...'\n"
        f"echo 'INF |  {FAKE_URL}  |'\nexec sleep 600\n")
    (fake_bin / "cloudflared").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "NB_APP_PORT": str(port),
           "NLP_APP_FEEDBACK_DB": str(tmp / "feedback.db"), "TMPDIR": str(tmp),
           "JUPYTER_PATH": str(tmp / "jupyter"), "NB_DATA_DIR": str(SHARED_DATA),
           "NB_RESULTS_DIR": str(tmp / "results"), "NB_DATASETS": "mnist",
           "NB_MODELS": " ".join(MODELS), "NB_EPOCHS": "2", "NB_WIDTH": "0.125", "NB_SUBSET": "1000",
           "NB_SEQ2SEQ_ARGS": SEQ2SEQ_TINY}
    mp = pytest.MonkeyPatch()
    for key, value in env.items():
        mp.setenv(key, value)
    mp.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the figures
    mp.delenv("PYTHONUNBUFFERED", raising=False)  # as on Colab: the notebook must ask for it itself

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = []
    for cell in nb.cells:
        if "colab-only" in tags(cell):
            continue
        cells.append(cell)
        if "train" in tags(cell):
            # The first run is interrupted (the cell's stop button: SIGINT to the kernel and the
            # program) in VGG's second epoch, after LeNet-5 has finished; then the cell runs again.
            cell.metadata["tags"] = ["train", "interrupted", "raises-exception"]
            again = copy.deepcopy(cell)
            again.metadata["tags"] = ["train", "second-run"]
            again["id"] = cell["id"] + "-again"
            cells.append(again)
        if "app" in tags(cell):  # what a visitor's browser first asks, then stop the app
            cells.append(nbformat.v4.new_code_cell(STOP_APP, metadata={"tags": ["test-stop-app"]}))
    nb.cells = cells
    # allow_errors: every cell runs, and each test below reports its own cell's error. The timeout is
    # per cell and generous: the whole notebook takes 1-2 min on 2 free cores, 18 min behind other jobs.
    client = InterruptingClient(nb, timeout=900, kernel_name="project-python", allow_errors=True,
                                resources={"metadata": {"path": str(ROOT)}})
    start = time.monotonic()
    try:
        client.execute()
    finally:
        mp.undo()
    seconds = time.monotonic() - start
    nbformat.write(nb, tmp / "colab.executed.ipynb")  # to look at when a test fails
    print(f"\ncolab.ipynb executed in {seconds:.0f} s: {tmp / 'colab.executed.ipynb'}")
    return nb, tmp / "results", seconds


class InterruptingClient(nbclient.NotebookClient):
    """Interrupts the kernel once, as the stop button does, when the cell tagged `interrupted`
    prints INTERRUPT_AT (VGG-16-BN's first epoch line: its checkpoint is already written)."""
    interrupted = False

    def output(self, outs, msg, display_id, cell_index):
        out = super().output(outs, msg, display_id, cell_index)
        if (not self.interrupted and "interrupted" in tags(self.nb.cells[cell_index])
                and msg["msg_type"] == "stream" and INTERRUPT_AT in "".join(o.get("text", "") for o in outs)):
            self.interrupted = True
            asyncio.ensure_future(nbclient.util.ensure_async(self.km.interrupt_kernel()))
        return out


def cell_after(nb, heading: str):
    """The first code cell after the markdown cell whose heading starts with `heading`."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown" and cell.source.startswith(f"## {heading}"):
            return next(c for c in nb.cells[i + 1:] if c.cell_type == "code")
    raise AssertionError(f"no section {heading!r}")


def test_no_cell_raises_but_the_interrupted_one(executed):
    nb, _, _ = executed
    for cell in nb.cells:
        if cell.cell_type == "code":
            text_of(cell)


def test_the_training_cell_interrupted_then_run_again_skips_and_resumes(executed):
    nb, results, _ = executed
    first, second = [c for c in nb.cells if "train" in tags(c)]
    out1, out2 = text_of(first), text_of(second)
    errors = [o for o in first.outputs if o["output_type"] == "error"]
    assert errors and errors[0]["ename"] == "KeyboardInterrupt"
    assert "mnist/lenet5: ok" in out1 and INTERRUPT_AT in out1 and "mnist/vgg: ok" not in out1
    assert "interrupted: finished pairs and the last epoch of the current one are saved" in out1
    # the second run: LeNet-5 is not trained again, VGG-16-BN goes on from its epoch 1
    assert re.search(r"mnist/lenet5: finished earlier with these settings .* skipped", out2), out2
    assert "LeNet-5 / mnist epoch" not in out2
    assert "resuming from the checkpoint after epoch 1" in out2 and "VGG-16-BN / mnist epoch  1/2" not in out2
    assert "VGG-16-BN / mnist epoch  2/2" in out2 and "mnist/vgg: ok" in out2
    for model in MODELS:
        assert (results / "cnn" / "mnist" / f"{model}.pkl").is_file()
    assert not list((results / "cnn" / "mnist").glob("*.checkpoint.pt"))


def test_the_report_cell_shows_the_table_and_every_plot_it_lists(executed):
    nb, results, _ = executed
    cell = cell_after(nb, "The comparison table")
    out = text_of(cell)
    assert "LeNet-5" in out and "VGG-16-BN" in out and "test" in out
    plots = [line for line in out.splitlines() if line.strip().startswith("plot: ")]
    assert plots and images_of(cell) == len(plots)
    assert all(str(results) in line for line in plots)  # drawn into the results folder (Drive)


def test_the_pickle_cell_opens_a_record_and_plots_its_curve(executed):
    nb, _, _ = executed
    cell = cell_after(nb, "One record")
    out = text_of(cell)
    assert re.search(r"LeNet-5 on mnist \| test accuracy 0\.\d{4} \| best epoch [12]\n", out), out
    assert images_of(cell) == 1


def test_the_gpu_cell_names_the_precision(executed):
    nb, _, _ = executed
    out = text_of(cell_after(nb, "The GPU"))
    import torch
    import cnn_project as cp
    precision, why = cp.choose_precision("auto", on_cpu=not torch.cuda.is_available())
    assert f"cnn_project.py will train with precision {precision} ({why})" in out


def test_the_seq2seq_cell_trains_and_shows_its_figures(executed):
    nb, results, _ = executed
    cell = cell_after(nb, "Seq2seq")
    text_of(cell)
    assert (results / "seq2seq" / "results.pkl").is_file()
    assert images_of(cell) == 4


def test_the_app_cell_serves_in_sharing_mode_behind_the_tunnel_and_prints_its_url(executed):
    nb, _, _ = executed
    out = text_of(next(c for c in nb.cells if "app" in tags(c)))
    assert f"public URL: {FAKE_URL}" in out, out
    assert "(sharing mode)" in out and "A stranger with that URL can" in out and "cannot" in out
    stop = text_of(next(c for c in nb.cells if "test-stop-app" in tags(c)))
    assert "health 200 ok" in stop and "app exit code" in stop
