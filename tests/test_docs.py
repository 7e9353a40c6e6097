"""The README landing page and docs/: every relative link and image resolves, the README stays short,
and the README's checkable claims (commands, figures, notebook cells) agree with the repository.

Reads files only: no torch, no network."""

import json
import pickle
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

# [text](target) and ![alt](target), and <img src="target">; a target may carry a "title".
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_TAG = re.compile(r"<img[^>]+src=\"([^\"]+)\"")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def links(page: Path) -> list:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks are not links
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return LINK.findall(text) + IMG_TAG.findall(text)


def test_the_pages_exist():
    names = {p.name for p in PAGES}
    assert {"README.md", "cnn_project.md", "seq2seq_project.md", "nlp_project.md",
            "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    found = links(page)
    assert found, f"{page.name} has no links at all: the link parser is broken"
    broken = []
    for target in found:
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path)).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top\n[a](missing.md) ![b](img/nothing.png) [c](#top) [d](#nope)\n")
    found = links(page)
    assert found == ["missing.md", "img/nothing.png", "#top", "#nope"]
    assert "top" in anchors(page) and "nope" not in anchors(page)


def test_readme_is_a_landing_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    text = README.read_text()
    for doc in ("docs/cnn_project.md", "docs/seq2seq_project.md", "docs/nlp_project.md",
                "docs/benchmarks.md"):
        assert f"]({doc}" in text, f"README does not link {doc}"


def test_readme_quick_start_commands_are_exact():
    text = README.read_text()
    assert "pip install -r requirements.txt && python cnn_project.py" in text
    assert "pip install -r requirements-dev.txt && python -m pytest -q" in text


def test_readme_colab_badge_opens_the_notebook():
    text = README.read_text()
    badge = re.search(r"\(https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/main/([^)]+)\)", text)
    assert badge, "no Open-in-Colab badge"
    assert (ROOT / badge.group(1)).is_file()
    assert "colab-badge.svg" in text


def test_readme_colab_and_sharing_statements():
    text = " ".join(README.read_text().split())
    assert "drive.flush_and_unmount()" in text and "at most the last epoch" in text
    assert "never install `requirements-dev.txt`" in text and "`-c constraints.txt`" in text
    assert "Binding to 127.0.0.1 does not make a tunnelled app private" in text
    assert "python nlp_project.py share" in text
    notebook = json.loads((ROOT / "colab.ipynb").read_text())
    source = "\n".join("".join(c["source"]) for c in notebook["cells"])
    for needle in ("drive.flush_and_unmount()", "nvidia-smi", "choose_precision", "nlp_project.py share",
                   "--results-dir", "pickle.load", "torch.__version__", "seq2seq_project.py"):
        assert needle in source, f"the notebook has no {needle}"


def _record(dataset, model):
    path = ROOT / "results" / "reference_cpu" / "cnn" / dataset / f"{model}.pkl"
    with open(path, "rb") as f:
        return pickle.load(f)  # plain Python and NumPy: no torch needed


MODELS = ("lenet5", "alexnet", "vgg", "resnet", "googlenet", "xception", "senet")


def _glance_rows() -> dict:
    """The README's results-at-a-glance table as {dataset cell: {column: cell}}."""
    lines = README.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| dataset |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


@pytest.mark.parametrize("dataset,label", [("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"),
                                           ("cifar10", "CIFAR-10")])
def test_readme_results_at_a_glance_match_the_committed_records(dataset, label):
    folder = ROOT / "results" / "reference_cpu" / "cnn" / dataset
    if not folder.is_dir():
        pytest.skip(f"no committed reference run in {folder}")
    records = {m: _record(dataset, m) for m in MODELS}
    row = next(r for name, r in _glance_rows().items() if name == label or name.startswith(f"{label},"))
    best = max(records, key=lambda m: records[m]["best_val_accuracy"])
    assert row["best model (on validation)"].startswith(records[best]["model_display_name"])
    assert row["test accuracy"] == f"**{100 * records[best]['test']['accuracy']:.2f}%**"
    others = sorted(100 * records[m]["test"]["accuracy"] for m in MODELS if m != best)
    assert row["the other six"] == f"{others[0]:.2f}-{others[-1]:.2f}%"
    epochs = {r["config"]["epochs"] for r in records.values()}
    rules = {r["config"].get("budget_rule") for r in records.values()}
    if len(epochs) == 1 and rules == {"equal epochs for every model on a dataset"}:
        assert row["budget"] == f"**{epochs.pop()} epochs for every model**"
    label_in_records = records[best].get("data", {}).get("label")
    if label_in_records:  # records that name their data: the README row names it the same way
        assert row["dataset"] == label_in_records


def test_readme_seq2seq_headline_matches_the_committed_run():
    with open(ROOT / "results" / "seq2seq" / "results.pkl", "rb") as f:
        res = pickle.load(f)
    att, base = res["models"]["attention"], res["models"]["baseline"]
    text = " ".join(README.read_text().split())
    assert att["test"]["exact_match"] == 1.0 and "**100% exact match**" in text
    assert f"{att['info']['epochs_run']} epochs, {att['info']['train_seconds']:.0f} s" in text
    assert f"{100 * base['test']['exact_match']:.1f}% without attention" in text
    assert f"{base['info']['epochs_run']} epochs, {base['info']['train_seconds']:.0f} s" in text

    def at(model, length):
        table = model["by_length"]
        return float(table["exact_match"][list(table["length"]).index(length)])
    assert f"attention holds {100 * at(att, 12):.0f}% at length 12" in text
    assert f"the baseline falls to {100 * at(base, 12):.0f}%" in text


def test_readme_app_speed_matches_the_committed_bench():
    bench = json.loads((ROOT / "results" / "nlp" / "bench_smollm2.json").read_text())["backends"]["llama.cpp"]
    text = " ".join(README.read_text().split())
    assert f"({bench['decode_tokens_per_s']:.0f} tokens/s decode, {bench['load_s']:.1f} s load;" in text


def _wall_seconds(log_name: str) -> int:
    """The wall time /usr/bin/time -v wrote at the end of a committed run log."""
    log = (ROOT / "results" / "reference_cpu" / log_name).read_text()
    found = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):(\d+)", log)
    h, m, s = (int(g or 0) for g in found.groups())
    return 3600 * h + 60 * m + s


def test_readme_cnn_wall_time_and_throughput_match_the_committed_logs():
    text = " ".join(README.read_text().split())
    mm, cifar = _wall_seconds("mnist_fashion_run.log"), _wall_seconds("cifar10_run.log")
    for n, t in ((14, mm), (7, cifar), (21, mm + cifar)):
        assert f"{n} trainings in {t // 60} min {t % 60:02d} s" in text, n
    import csv
    rows = list(csv.DictReader(open(ROOT / "results" / "benchmarks" / "cnn_throughput.csv")))
    speedups = [float(r["ours_speedup"]) for r in rows if r["pipeline"] == "naive"]
    mfu = max(float(r["mfu"]) for r in rows if r["pipeline"] == "ours")
    assert f"({min(speedups):.1f}-{max(speedups):.1f}× faster, MFU up to {100 * mfu:.0f}% on CPU)" in text


def test_readme_ranges_of_the_five_later_designs_match_the_committed_records():
    text = " ".join(README.read_text().split())
    later = ("vgg", "resnet", "googlenet", "xception", "senet")
    for dataset in ("mnist", "fashion_mnist", "cifar10"):
        acc = sorted(100 * _record(dataset, m)["test"]["accuracy"] for m in later)
        assert f"{acc[0]:.2f}-{acc[-1]:.2f}%" in text, dataset
    for model in ("lenet5", "alexnet"):
        assert f"({100 * _record('cifar10', model)['test']['accuracy']:.2f}%)" in text, model


def test_readme_every_model_still_improving_at_its_last_epoch_is_true_of_the_records():
    assert "Every model was still improving at its last epoch" in " ".join(README.read_text().split())
    for dataset in ("mnist", "fashion_mnist", "cifar10"):
        for m in MODELS:
            r = _record(dataset, m)
            assert r["best_epoch"] == r["config"]["epochs"], (dataset, m)
