"""The README landing page and docs/: every relative link and image resolves, the README stays short,
and the README's checkable claims (commands, times, figures, notebook cells) agree with the repository.

Reads files only, no network; one test runs the CIFAR-10 recipe of the README and docs on a few
made-up images (it needs torch, torchvision and Pillow)."""

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


# Words of the measurement report that a learner's landing page keeps out of its first screen.
NOT_ON_THE_FIRST_SCREEN = re.compile(r"mcnemar|bootstrap|p-value|\b(?:PFLOP|MFU|AVX|MPS)", re.I)


def test_readme_is_a_landing_page_for_learners():
    """At most 120 lines, no statistics or hardware jargon in its first 40, and links into the docs."""
    lines = README.read_text().splitlines()
    assert len(lines) <= 120, f"README.md has {len(lines)} lines (at most 120)"
    jargon = [(n, m.group(0)) for n, line in enumerate(lines[:40], 1)
              for m in NOT_ON_THE_FIRST_SCREEN.finditer(line)]
    assert not jargon, jargon
    text = README.read_text()
    for doc in ("docs/cnn_project.md", "docs/seq2seq_project.md", "docs/nlp_project.md",
                "docs/benchmarks.md"):
        assert f"]({doc}" in text, f"README does not link {doc}"


def test_the_jargon_check_sees_each_word():
    for line in ("an exact McNemar test", "a paired bootstrap interval", "40 PFLOP", "MFU 83%",
                 "AVX-512 BF16", "through CUDA MPS", "its p-value"):
        assert NOT_ON_THE_FIRST_SCREEN.search(line), line
    for line in ("jumps over samples", "p < 0.05", "accuracy per model"):
        assert not NOT_ON_THE_FIRST_SCREEN.search(line), line


def test_readme_quick_start_commands_are_exact():
    """Show first, train second: the committed comparison, then the short training, then the main job."""
    text = README.read_text()
    assert "pip install -r requirements-dev.txt && python -m pytest -q" in text
    lines = [line.split("#")[0].strip() for line in _quick_start_block().splitlines()]
    order = ["pip install -r requirements.txt",
             "python cnn_project.py --report --results-dir results/reference_cpu",
             "python cnn_project.py --preset cpu --datasets mnist --models lenet5",
             "python cnn_project.py"]
    assert all(c in lines for c in order) and [lines.index(c) for c in order] == sorted(lines.index(c) for c in order)
    assert "python seq2seq_project.py" in lines


def _quick_start_block() -> str:
    """The first code block under '## Start on a laptop'."""
    text = README.read_text()
    section = text[text.index("## Start on a laptop\n"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def _readme_table(first_column: str) -> dict:
    """The README table whose header starts with `| first_column |`, as {first cell: {column: cell}}."""
    lines = README.read_text().splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    columns = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells))
    return rows


def _time_table() -> dict:
    """The quick start's table of times: {command: {column: cell}}, the command without backticks and
    without a trailing '(...)' note."""
    return {re.match(r"`([^`]+)`", cell).group(1): row for cell, row in _readme_table("command").items()}


def test_readme_quick_start_states_time_and_place_for_every_command():
    """Every command of the quick start has a row with a time on 2 CPU cores and on a Colab T4 (the T4
    column marked as an estimate), and every command that writes something says where."""
    rows = _time_table()
    columns = list(next(iter(rows.values())))
    cpu = next(c for c in columns if "CPU" in c)
    t4 = next(c for c in columns if "T4" in c)
    where = next(c for c in columns if "results" in c)
    assert "estimate" in t4 and "measured" in cpu
    commands = [line.split("#")[0].strip() for line in _quick_start_block().splitlines() if line.strip()]
    for command in commands:  # a row for the whole line, or one for each of its commands
        assert command in rows or all(part in rows for part in command.split(" && ")), command
    for command, row in rows.items():
        assert re.search(r"\d|seconds|minute", row[cpu]) and re.search(r"\d|seconds|minute|same|not on", row[t4]), row
        if command.startswith(("python", "streamlit")):
            assert "results/" in row[where] or "printed" in row[where], row


def test_readme_quick_start_times_match_the_committed_logs():
    rows = _time_table()
    cpu = next(c for c in next(iter(rows.values())) if "CPU" in c)
    mm, cifar = _wall_seconds("mnist_fashion_run.log"), _wall_seconds("cifar10_run.log")
    total = round((mm + cifar) / 60)
    assert rows["python cnn_project.py"][cpu].startswith(f"{total // 60} h {total % 60:02d} min")
    assert rows["python cnn_project.py --preset cpu"][cpu] == f"{total // 60} h {total % 60:02d} min"
    log = (ROOT / "results" / "reference_cpu" / "mnist_fashion_run.log").read_text()
    mnist_part = re.search(r"\] fashion_mnist/\w+: .* elapsed (\d+) min", log)  # when MNIST's 7 were done
    assert rows["python cnn_project.py --preset cpu --datasets mnist"][cpu] == f"{mnist_part.group(1)} min"
    lenet = re.search(r"mnist/lenet5: ok, test accuracy [\d.]+%, (\d+) s", log)
    assert f"(the pair itself: {lenet.group(1)} s)" in rows["python cnn_project.py --preset cpu --datasets mnist --models lenet5"][cpu]
    seq = (ROOT / "results" / "reference_seq2seq" / "run_log.txt").read_text()
    m, sec = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\d+):([\d.]+)", seq).groups()
    seconds = round(60 * int(m) + float(sec))
    assert rows["python seq2seq_project.py"][cpu] == f"{seconds // 60} min {seconds % 60} s"
    suite = rows["pip install -r requirements-dev.txt && python -m pytest -q"][cpu].split(" (")[0]
    assert f"in {suite} of pytest" in " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())


def test_readme_colab_badge_and_the_one_step_after_forking():
    """The badge opens Colab's GitHub browser (right for any fork: the owner is not in the URL), and
    one paragraph says what to do after forking: open colab.ipynb, fill in REPO_URL, Run all. That
    field is the notebook's first form field, with the placeholder the first cell checks."""
    text = README.read_text()
    badge = re.search(r"\[!\[Open In Colab\]\(https://colab\.research\.google\.com/assets/colab-badge\.svg\)\]"
                      r"\((https://[^)]+)\)", text)
    assert badge and badge.group(1) == "https://colab.research.google.com/github/"
    step = next(p for p in text.split("\n\n") if p.startswith("**After forking, one step:**"))
    step = " ".join(step.split())
    assert "`colab.ipynb`" in step and "`REPO_URL`" in step and "*Runtime → Run all*" in step
    notebook = json.loads((ROOT / "colab.ipynb").read_text())
    first = "".join(next(c for c in notebook["cells"] if c["cell_type"] == "code")["source"])
    field = re.search(r'^REPO_URL = "([^"]+)"  # @param', first, re.M)
    assert field and "YOUR-GITHUB-USER/YOUR-FORK" in field.group(1)
    assert "raise RepoUrlNotSet" in first


def test_colab_and_sharing_statements_where_the_readme_sends_them():
    """The README names `share` and links the why; the docs hold Drive's sync, Colab's install rule
    and the tunnel's security model."""
    flat = lambda page: " ".join((ROOT / page).read_text().split())
    assert "python nlp_project.py share" in flat("README.md")
    assert "](docs/nlp_project.md#serving-the-app-to-other-people)" in flat("README.md")
    cnn, nlp = flat("docs/cnn_project.md"), flat("docs/nlp_project.md")
    assert "drive.flush_and_unmount()" in cnn and "at most the last epoch" in cnn
    assert "never install `requirements-dev.txt`" in cnn and "`-c constraints.txt`" in cnn
    assert "Binding to 127.0.0.1 does not make a tunnelled app private" in nlp
    assert "python nlp_project.py share" in nlp
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


GLANCE = re.compile(r"^- \*\*(?P<label>[^*]+)\*\* \((?P<epochs>\d+) epochs for every model\): "
                    r"(?P<best>[\w-]+) is best on validation, and (?P<tied>.+?) (?:is|are) tied with it "
                    r"within noise \((?P<range>[\d.]+-[\d.]+%)\); (?P<worse>.+?) (?:is|are) worse\.$", re.M)


def _names(words: str) -> list:
    """'A, B and C' -> ['A', 'B', 'C']."""
    return [n.strip() for n in re.split(r",| and ", words) if n.strip()]


def _glance_rows() -> dict:
    """The README's results at a glance, one sentence per dataset, as {label: its parts}."""
    return {m["label"]: m.groupdict() for m in GLANCE.finditer(README.read_text())}


def _summary() -> dict:
    with open(ROOT / "results" / "reference_cpu" / "cnn_results.pkl", "rb") as f:
        return pickle.load(f)  # rebuilt by --report from the records; plain Python and NumPy


@pytest.mark.parametrize("dataset,label", [("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"),
                                           ("cifar10", "CIFAR-10")])
def test_readme_results_at_a_glance_match_the_committed_verdicts(dataset, label):
    """The README's table names the tied group and the separable models exactly as the committed
    summary's verdicts do, never a single winner, and its accuracy range and budget are the records'."""
    folder = ROOT / "results" / "reference_cpu" / "cnn" / dataset
    if not folder.is_dir():
        pytest.skip(f"no committed reference run in {folder}")
    summary = _summary()["summary"][dataset]
    records = {m: _record(dataset, m) for m in MODELS}
    name = {m: r["model_display_name"] for m, r in records.items()}
    row = next(r for cell, r in _glance_rows().items() if cell == label or cell.startswith(f"{label},"))
    best, pairs = summary["best"], summary["pairs"]
    assert {p["n_seeds"] for p in pairs.values()} == {3}  # "3 seeds per model"
    assert best == max(pairs, key=lambda m: pairs[m]["best_val_accuracy_mean"])  # chosen on validation
    assert row["best"] == name[best]
    tied = [m for m, p in pairs.items() if p["verdict"] == "tied with the best within noise"]
    assert _names(row["tied"]) == [name[m] for m in tied] and tied  # as committed: never a single winner
    worse = [m for m, p in pairs.items() if p["verdict"] == "worse, p < 0.05"]
    assert _names(row["worse"]) == [name[m] for m in worse]
    acc = sorted(100 * pairs[m]["test_accuracy_mean"] for m in [best, *tied])
    assert row["range"] == f"{acc[0]:.2f}-{acc[-1]:.2f}%"
    epochs = {r["config"]["epochs"] for r in records.values()}
    rules = {r["config"].get("budget_rule") for r in records.values()}
    assert len(epochs) == 1 and rules == {"equal epochs for every model on a dataset"}
    assert row["epochs"] == str(epochs.pop())
    assert row["label"] == records[best]["data"].get("label", label)


def test_the_docs_verdict_table_matches_the_committed_summary():
    text = (ROOT / "docs" / "cnn_project.md").read_text()
    summary = _summary()
    for dataset, v in summary["summary"].items():
        for model, p in v["pairs"].items():
            if p["verdict"] == "best on validation":
                continue
            cells = (f"| {100 * p['test_accuracy_mean']:.2f}% | {100 * p['difference']:+.2f} "
                     f"({100 * p['ci_low']:+.2f} to {100 * p['ci_high']:+.2f}) | {p['p_max']:.2g} | "
                     f"{p['verdict']} |")
            assert cells in text, (dataset, model, cells)


def test_readme_seq2seq_headline_matches_the_committed_run():
    with open(ROOT / "results" / "reference_seq2seq" / "results.pkl", "rb") as f:
        res = pickle.load(f)
    att, base = res["models"]["attention"], res["models"]["baseline"]
    text = " ".join(README.read_text().split())
    present = [length for length, n in enumerate(res["data"]["test_length_counts"]) if n]
    stated = re.search(r"reverses held-out sequences of lengths (\d+)-(\d+) with", text)
    assert stated and (int(stated.group(1)), int(stated.group(2))) == (present[0], present[-1])
    assert sum(res["data"]["test_length_counts"]) == att["test"]["n"]
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


def test_benchmarks_cnn_wall_time_and_throughput_match_the_committed_logs():
    text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    mm, cifar = _wall_seconds("mnist_fashion_run.log"), _wall_seconds("cifar10_run.log")
    for n, t in ((14, mm), (7, cifar), (21, mm + cifar)):
        assert f"{n} trainings in {t // 60} min {t % 60:02d} s" in text, n
    import csv
    rows = list(csv.DictReader(open(ROOT / "results" / "benchmarks" / "cnn_throughput.csv")))
    speedups = [float(r["ours_speedup"]) for r in rows if r["pipeline"] == "naive"]
    mfu = max(float(r["mfu"]) for r in rows if r["pipeline"] == "ours")
    assert f"({min(speedups):.1f}-{max(speedups):.1f}× faster, MFU up to {100 * mfu:.0f}% on CPU)" in text


def test_readme_ranges_of_the_five_later_designs_match_the_committed_summary():
    text = " ".join(README.read_text().split())
    pairs = {d: v["pairs"] for d, v in _summary()["summary"].items()}
    later = ("vgg", "resnet", "googlenet", "xception", "senet")
    for dataset in ("mnist", "fashion_mnist", "cifar10"):
        acc = sorted(100 * pairs[dataset][m]["test_accuracy_mean"] for m in later)
        assert f"{acc[0]:.2f}-{acc[-1]:.2f}%" in text, dataset
    for model in ("lenet5", "alexnet"):
        assert f"({100 * pairs['cifar10'][model]['test_accuracy_mean']:.2f}%)" in text, model


def _seed_ranges() -> dict:
    """{(dataset, model): (lowest, highest) test accuracy in % over the committed seeds}, from the
    records themselves."""
    return {(d, m): (min(a), max(a)) for d, by_model in _summary()["runs"].items()
            for m, by_seed in by_model.items()
            for a in [[100 * r["test"]["accuracy"] for r in by_seed.values()]]}


@pytest.mark.parametrize("page", [ROOT / "docs" / "cnn_project.md"])
def test_how_far_seeds_move_accuracy_is_the_range_over_seeds_in_the_records(page):
    text = " ".join(page.read_text().split())
    ranges = _seed_ranges()
    moves = {k: round(hi, 2) - round(lo, 2) for k, (lo, hi) in ranges.items()}
    worst = max(moves, key=moves.get)
    lo, hi = ranges[worst]
    assert worst == ("cifar10", "lenet5") and f"by up to {moves[worst]:.2f} points" in text
    assert f"{lo:.2f}% to {hi:.2f}%" in text
    others = sorted(v for k, v in moves.items() if k != worst)
    assert f"{others[0]:.2f}-{others[-1]:.2f} for the others" in text
    assert "0.94 points" not in text  # a standard deviation is not how far seeds move it


def _torch_by_seed(folder: str) -> dict:
    """{torch version: sorted seeds} over every committed record of a results folder."""
    with open(ROOT / "results" / folder / "cnn_results.pkl", "rb") as f:
        runs = pickle.load(f)["runs"]
    found = {}
    for by_model in runs.values():
        for by_seed in by_model.values():
            for seed, r in by_seed.items():
                found.setdefault(r["versions"]["torch"].split("+")[0], set()).add(seed)
    return {v: sorted(s) for v, s in found.items()}


def test_the_stated_torch_of_each_committed_run_is_the_one_its_records_store():
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    cpu, gpu = _torch_by_seed("reference_cpu"), _torch_by_seed("reference_gpu")
    assert cpu[pinned] == [0] and len(cpu) == 2 and pinned not in gpu, (cpu, gpu)
    other = next(v for v in cpu if v != pinned)
    assert cpu[other] == [1, 2] and set(gpu) == {other}
    for page in (ROOT / "docs" / "cnn_project.md",):
        text = " ".join(page.read_text().split())
        assert f"torch {pinned}" in text and "seed 0 of the committed CPU run" in text, page
        assert f"seeds 1 and 2 and the GPU run were trained on torch {other}" in text, page
        assert "pins the exact torch" not in text and "The exact releases of the committed runs" not in text


def test_readme_every_model_still_improving_at_its_last_epoch_is_true_of_the_records():
    assert "Every model was still improving at its last epoch" in " ".join(README.read_text().split())
    for dataset, by_model in _summary()["runs"].items():
        for m, by_seed in by_model.items():
            for seed, r in by_seed.items():
                assert r["best_epoch"] == r["config"]["epochs"], (dataset, m, seed)


def test_docs_seeds_1_and_2_wall_time_and_hardware_match_their_log():
    """Seeds 1 and 2 ran as parallel processes on one GPU; the log's status lines say when each
    process ended (seconds after the start), and every record names that GPU."""
    text = " ".join((ROOT / "docs" / "cnn_project.md").read_text().split())
    log = (ROOT / "results" / "reference_cpu" / "seeds_1_2_h200_run.log").read_text()
    ends = [int(t) for t, name in re.findall(r"\[t=(\d+)s\] (cpu_\S+) rc=0", log)]
    assert len(ends) == 20 and "20 processes shared it" in text
    runs = _summary()["runs"]
    later = [r for by_model in runs.values() for by_seed in by_model.values()
             for s, r in by_seed.items() if s in (1, 2)]
    assert len(later) == 42 and {r["versions"]["gpu"] for r in later} == {"NVIDIA H200"}
    assert {r["config"]["precision"] for by_model in runs.values() for by_seed in by_model.values()
            for r in by_seed.values()} == {"bf16"}
    assert f"The 42 records" in text and f"Wall time **{max(ends) // 60} min {max(ends) % 60:02d} s**" in text


@pytest.mark.parametrize("page", [ROOT / "docs" / "cnn_project.md"], ids=lambda p: p.name)
def test_the_cifar10_jpeg_recipe_writes_a_copy_the_program_reads(page, tmp_path, monkeypatch):
    """The recipe's Python, run on a made-up stand-in for torchvision's CIFAR10 (two images per class
    and split, official order), writes cifar_jpeg/CIFAR10-JPEG/{train,test}/<class>/0000.jpg ... that
    cnn_project.py picks under --data-dir cifar_jpeg and names 'CIFAR-10, JPEG q75 copy'."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    torchvision = pytest.importorskip("torchvision")
    import cnn_project as cp
    script = re.search(r"```python\n(.*?CIFAR10-JPEG.*?)```", page.read_text(), re.S).group(1)
    rng = np.random.default_rng(0)
    classes = list(cp.DATASETS["cifar10"].classes)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.classes = classes
            self.items = [(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), k)
                          for _ in range(2) for k in range(10)]

        def __iter__(self):
            return iter(self.items)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.chdir(tmp_path)
    exec(compile(script, page.name, "exec"), {})
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.jpg"))
    assert len(names) == 40 and "cifar_jpeg/CIFAR10-JPEG/test/truck/0001.jpg" in names
    spec = cp.DATASETS["cifar10"]
    assert cp.data_source(spec, "cifar_jpeg") == str(Path("cifar_jpeg") / "CIFAR10-JPEG")
    data = cp.read_image_folder(Path("cifar_jpeg/CIFAR10-JPEG"), None, 0, None, show_progress=False)
    assert data["classes"] == classes and tuple(data["train_x"].shape) == (20, 3, 32, 32)
    assert cp.data_label(spec, data["source"]) == "CIFAR-10, JPEG q75 copy"
    command = "python cnn_project.py --datasets cifar10 --data-dir cifar_jpeg"
    assert command in page.read_text()


def test_readme_and_docs_gpu_preset_figures_match_its_committed_summary():
    """The GPU preset's CIFAR-10 run (results/reference_gpu): the README's sentence and the docs'
    table give its best, its tied model, the separable ones, their seeds and means as --report does."""
    with open(ROOT / "results" / "reference_gpu" / "cnn_results.pkl", "rb") as f:
        gpu = pickle.load(f)
    cpu = _summary()["summary"]["cifar10"]["pairs"]
    v = gpu["summary"]["cifar10"]
    pairs, name = v["pairs"], {m: next(iter(s.values()))["model_display_name"]
                               for m, s in gpu["runs"]["cifar10"].items()}
    text = " ".join(README.read_text().split())
    best = pairs[v["best"]]
    assert v["best"] == "resnet" and f"ResNet-18 {100 * best['test_accuracy_mean']:.2f}% ({best['n_seeds']} seeds)" in text
    tied = [m for m, p in pairs.items() if p["verdict"] == "tied with the best within noise"]
    assert tied == ["senet"] and (f"tied with SE-ResNet-18 ({100 * pairs['senet']['test_accuracy_mean']:.2f}%, "
                                  f"{pairs['senet']['n_seeds']} seed)") in text
    worse = {m for m, p in pairs.items() if p["verdict"] == "worse, p < 0.05"}
    assert worse == {"lenet5", "alexnet", "vgg", "googlenet", "xception"}
    gains = [100 * (pairs[m]["test_accuracy_mean"] - cpu[m]["test_accuracy_mean"]) for m in pairs]
    assert f"every model gains {min(gains):.0f}-{max(gains):.0f} points on CIFAR-10" in text
    assert f"adds {min(gains):.0f}-{max(gains):.0f} points to every model" in " ".join(
        (ROOT / "docs" / "cnn_project.md").read_text().split())
    docs = (ROOT / "docs" / "cnn_project.md").read_text()
    for m, p in pairs.items():
        shown = f"**{name[m]}**" if m == v["best"] else name[m]
        row = (f"| {shown} | {gpu['runs']['cifar10'][m][0]['params']:,} | {p['n_seeds']} | "
               f"{100 * p['test_accuracy_mean']:.2f}% | {100 * cpu[m]['test_accuracy_mean']:.2f}% | ")
        assert row in docs, row


# The architecture lessons at the top of docs/cnn_project.md: one "###" section per model, each with
# its size in a fixed form ("parameters: 11,173,962 at width 1.0, 701,466 at width 0.25; MACs per
# image: ..."), its accuracy on every dataset and its verdicts, all as the committed records say.
CNN_DOC = ROOT / "docs" / "cnn_project.md"
SIZE = re.compile(r"parameters: ([\d,]+) at width 1\.0(?:, ([\d,]+) at width 0\.25| \(both presets\)); "
                  r"MACs per image: ([\d,]+) at width 1\.0(?:, ([\d,]+) at width 0\.25)?\.")


def _architecture_sections() -> dict:
    """{### heading: its text, whitespace collapsed} for the sections under '## The seven architectures'."""
    text = re.sub(r"```.*?```", "", CNN_DOC.read_text(), flags=re.S)
    part = text.split("\n## The seven architectures\n", 1)[1].split("\n## ", 1)[0]
    chunks = re.split(r"^### (.*)$", part, flags=re.M)[1:]
    return {head: " ".join(body.split()) for head, body in zip(chunks[::2], chunks[1::2])}


def _display_names() -> dict:
    import cnn_project as cp
    return {m: display for m, (display, _) in cp.MODELS_REGISTRY.items()}


def test_cnn_docs_open_with_a_section_per_architecture_before_installation_data_and_usage():
    headings = re.findall(r"^(#{2,3}) (.*)$", re.sub(r"```.*?```", "", CNN_DOC.read_text(), flags=re.S),
                          flags=re.M)
    first_setup = next(i for i, (_, h) in enumerate(headings)
                       if re.search(r"install|data|usage", h, re.I))
    assert headings[0] == ("##", "The seven architectures")
    names = _display_names()
    assert len(names) == 7
    for model, name in names.items():
        at = [i for i, (level, h) in enumerate(headings) if level == "###" and h.startswith(f"{name}:")]
        assert len(at) == 1 and at[0] < first_setup, (model, name)


@pytest.mark.parametrize("model", MODELS)
def test_each_architecture_section_states_the_records_sizes_accuracies_and_verdicts(model):
    """Width 1.0 is the GPU preset's CIFAR-10 record (LeNet-5's CPU one: it trains at 1.0 in both),
    width 0.25 the CPU preset's; accuracies are the committed CPU run's mean ± std over its seeds."""
    import cnn_project as cp
    name = _display_names()[model]
    body = next(b for h, b in _architecture_sections().items() if h.startswith(f"{name}:"))
    cpu = _record("cifar10", model)
    with open(ROOT / "results" / "reference_gpu" / "cnn" / "cifar10" / f"{model}.pkl", "rb") as f:
        gpu = pickle.load(f)
    wide = cpu if model == "lenet5" else gpu
    assert wide["config"]["width"] == 1.0
    found = SIZE.findall(body)
    assert len(found) == 1, body[:200]
    params_1, params_q, macs_1, macs_q = (int(n.replace(",", "")) if n else None for n in found[0])
    assert (params_1, macs_1) == (wide["params"], wide["macs_per_image"])
    if model == "lenet5":
        assert params_q is None and macs_q is None and cpu["config"]["width"] == 1.0
    else:
        assert cpu["config"]["width"] == 0.25
        assert (params_q, macs_q) == (cpu["params"], cpu["macs_per_image"])
    assert f"class `{type(cp.build_model(model, 3, 10, 0.125, 32)).__name__}`" in body \
        or f"`{type(cp.build_model(model, 3, 10, 0.125, 32)).__name__}`" in body
    shown = body.split("What the results show.** ", 1)[1]
    cpu_part = shown.split("In the GPU run", 1)[0]
    verdicts = set()
    for dataset, label in (("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST"), ("cifar10", "CIFAR-10")):
        p = _summary()["summary"][dataset]["pairs"][model]
        figure = f"{100 * p['test_accuracy_mean']:.2f} ± {100 * p['test_accuracy_std']:.2f}%"
        assert re.search(rf"{re.escape(figure)} on {label}\b|\b{label} \({re.escape(figure)}\)", cpu_part), \
            (dataset, figure)
        verdicts.add(p["verdict"])
    italic = re.findall(r"(?<!\*)\*([^*\s][^*]*)\*(?!\*)", cpu_part)
    assert {v.lower() for v in italic} == verdicts


def test_seq2seq_docs_explain_attention_beside_the_committed_heatmap():
    import ast
    text = (ROOT / "docs" / "seq2seq_project.md").read_text()
    section = text.split("\n## Attention, step by step\n", 1)[1].split("\n## ", 1)[0]
    assert "e_ij = v^T tanh(W s_{i-1} + U h_j)" in section and "softmax" in section
    assert "](../results/reference_seq2seq/attention_heatmaps.png)" in section
    assert "anti-diagonal" in section
    source = ast.parse((ROOT / "seq2seq_project.py").read_text())
    classes = {n.name for n in source.body if isinstance(n, ast.ClassDef)}
    named = set(re.findall(r"`([A-Z][a-z]\w*)(?:\.\w+)?`", section))
    assert {"AdditiveAttention", "Decoder", "Encoder", "Seq2Seq"} <= named <= classes
    with open(ROOT / "results" / "reference_seq2seq" / "results.pkl", "rb") as f:
        models = pickle.load(f)["models"]
    at = {m: dict(zip(r["by_length"]["length"].tolist(), r["by_length"]["exact_match"].tolist()))
          for m, r in models.items()}
    base, att = at["baseline"], at["attention"]
    flat = " ".join(section.split())
    assert (f"at length 10 it gets {base[10]:.3f} of the sequences exactly right, at 11 only {base[11]:.3f}, "
            f"at 12 {base[12]:.3f} and at 13 {base[13]:.3f}, while attention holds {att[11]:.3f}, "
            f"{att[12]:.3f} and {att[13]:.3f} at 11, 12 and 13") in flat
    first_all_wrong = min(n for n in base if all(at[m][k] == 0 for m in at for k in at[m] if k >= n))
    assert f"From length {first_all_wrong} on both get none right" in flat
    longest = max(models["attention"]["attention_examples"], key=lambda e: len(e["source"]))
    assert len(longest["prediction"]) != len(longest["source"])  # the third panel: reversed wrongly
    assert f"length {len(longest['source'])}, which the model never saw" in flat
    assert f"({len(longest['prediction'])} digits instead of {len(longest['source'])})" in flat


def _cifar10_runs(folder: str) -> dict:
    """{model: {seed: record}} of CIFAR-10 in a committed results folder."""
    with open(ROOT / "results" / folder / "cnn_results.pkl", "rb") as f:
        return pickle.load(f)["runs"]["cifar10"]


def _section(page: Path, heading: str) -> str:
    """The text under '## heading' up to the next '## ', whitespace collapsed."""
    text = page.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return " ".join(text.split())


def test_the_worked_example_of_seeds_and_paired_tests_is_computed_from_the_records():
    """ResNet-18 against GoogLeNet on CIFAR-10: each seed's accuracy, the means, the validation
    choice (also seed 0's alone), the images each got right alone, McNemar's p per seed, the paired
    interval and the verdict, all recomputed from the committed records with the program's own tests;
    and SE-ResNet-18's counterexample."""
    np = pytest.importorskip("numpy")
    import cnn_project as cp
    text = _section(CNN_DOC, "Seeds and paired tests: a worked example")
    runs = _cifar10_runs("reference_cpu")
    pct = lambda x: f"{100 * x:.2f}%"
    for model, name in (("resnet", "ResNet-18"), ("googlenet", "GoogLeNet")):
        by_seed = runs[model]
        test = [by_seed[s]["test"]["accuracy"] for s in (0, 1, 2)]
        val = np.mean([by_seed[s]["best_val_accuracy"] for s in (0, 1, 2)])
        row = f"| {name} | " + " | ".join(pct(a) for a in test) + f" | {pct(np.mean(test))} | {pct(val)} |"
        assert row in text, row
    assert cp.best_models({"cifar10": runs})["cifar10"] == "resnet"
    seed0 = {m: runs[m][0]["best_val_accuracy"] for m in ("resnet", "googlenet")}
    assert seed0["googlenet"] > seed0["resnet"]
    assert f"GoogLeNet would have been chosen ({pct(seed0['googlenet'])} against {pct(seed0['resnet'])}" in text
    right = {m: [cp.correct_on_test(runs[m][s]) for s in (0, 1, 2)] for m in ("resnet", "googlenet", "senet")}
    r, g = right["resnet"][0], right["googlenet"][0]
    assert f"both were right on {int((r & g).sum()):,} images and both wrong on {int((~r & ~g).sum()):,}" in text
    seeds = [cp.mcnemar_exact(right["googlenet"][s], right["resnet"][s]) for s in (0, 1, 2)]
    t0 = seeds[0]
    assert (f"{t0['only_b']} images only ResNet-18 got right, {t0['only_a']} only GoogLeNet" in text
            and f"each of these {t0['only_a'] + t0['only_b']:,} disagreements" in text
            and f"as uneven as {t0['only_b']} to {t0['only_a']}: p = {t0['p_value']:.2g}" in text)
    for s, label in ((1, "Seed 1"), (2, "seed 2")):
        t = seeds[s]
        assert f"{label}: {t['only_b']} to {t['only_a']}, p = {t['p_value']:.2g}" in text, label
    verdict = cp.compare_with_best(runs["googlenet"], runs["resnet"])
    assert verdict["verdict"] == "tied with the best within noise" in text
    assert (f"{100 * verdict['difference']:.2f} points, {100 * verdict['ci_low']:.2f} to "
            f"{100 * verdict['ci_high']:.2f}) lies below zero") in text and verdict["ci_high"] < 0
    assert sum(p < cp.ALPHA for p in verdict["p_values"]) == 1 and "only one seed of three gives p < 0.05" in text
    se = [cp.mcnemar_exact(right["senet"][s], right["resnet"][s]) for s in (0, 1, 2)]
    counts = ", ".join(f"{t['only_b']} to {t['only_a']}" for t in se[:2]) + f" and {se[2]['only_b']} to {se[2]['only_a']}"
    ps = ", ".join(f"{t['p_value']:.2g}" for t in se[:2]) + f" and {se[2]['p_value']:.2g}"
    assert f"{counts} in ResNet-18's favour, p = {ps}" in text
    assert cp.compare_with_best(runs["senet"], runs["resnet"])["verdict"] == "worse, p < 0.05"
    moves = {m: round(100 * max(a), 2) - round(100 * min(a), 2)
             for m, by_seed in runs.items() for a in [[r["test"]["accuracy"] for r in by_seed.values()]]}
    others = [v for m, v in moves.items() if m != "lenet5"]
    assert f"lie {moves['resnet']:.2f} points apart" in text and f"GoogLeNet's {moves['googlenet']:.2f}" in text
    assert f"by {min(others):.2f} to {max(others):.2f} points, and LeNet-5 by {moves['lenet5']:.2f}" in text


def test_cpu_or_gpu_sets_the_committed_runs_side_by_side_as_their_records_say():
    """Per model on CIFAR-10: widths, training time and test accuracy of the cpu preset on 2 CPU cores
    (seed 0), of the same preset on the GPU (seeds 1-2), and of the gpu preset; the hardware, epochs
    and precision the section names are the records'; the sentences' sums and gaps hold."""
    np = pytest.importorskip("numpy")
    text = _section(CNN_DOC, "CPU or GPU")
    cpu, gpu = _cifar10_runs("reference_cpu"), _cifar10_runs("reference_gpu")
    t = lambda rs: f"{np.mean([r['train_time_s'] for r in rs]):.0f} s"
    acc = lambda rs: f"{100 * np.mean([r['test']['accuracy'] for r in rs]):.2f}%"
    for model, by_seed in cpu.items():
        on_cpu, on_gpu, wide = [by_seed[0]], [by_seed[1], by_seed[2]], list(gpu[model].values())
        assert on_cpu[0]["versions"]["gpu"] is None and on_cpu[0]["versions"]["cpu_count"] == 2
        assert {r["versions"]["gpu"] for r in on_gpu + wide} == {"NVIDIA H200"}
        assert {r["config"]["epochs"] for r in on_cpu + on_gpu} == {10} and {r["config"]["epochs"] for r in wide} == {30}
        assert {r["config"]["precision"] for r in on_cpu + on_gpu + wide} == {"bf16"}
        row = (f"| {on_cpu[0]['model_display_name']} | {on_cpu[0]['config']['width']:g} / "
               f"{wide[0]['config']['width']:g} | {t(on_cpu)}, {acc(on_cpu)} | {t(on_gpu)}, {acc(on_gpu)} | "
               f"{t(wide)}, {acc(wide)} ({len(wide)}) |")
        assert row in text, row
        spread = max(r["test"]["accuracy"] for r in by_seed.values()) - min(r["test"]["accuracy"] for r in by_seed.values())
        gap = np.mean([r["test"]["accuracy"] for r in on_gpu]) - on_cpu[0]["test"]["accuracy"]
        assert abs(gap) <= spread, model  # "within the spread of seeds"
    assert f"`{cpu['resnet'][0]['config']['precision_reason']}`" in text
    minutes = lambda seeds: round(sum(np.mean([cpu[m][s]["train_time_s"] for s in seeds]) for m in cpu) / 60)
    assert f"took {minutes([0])} minutes of training on 2 CPU cores and {minutes([1, 2])} on the H200" in text
    gaps = {m: round(100 * (np.mean([cpu[m][s]["test"]["accuracy"] for s in (1, 2)]) - cpu[m][0]["test"]["accuracy"]), 2)
            for m in cpu}
    assert max(gaps.values()) == gaps["lenet5"] and f"(at most {gaps['lenet5']:.2f} points, LeNet-5)" in text


def test_the_t4_estimates_are_the_counted_compute_over_the_stated_speeds():
    """docs/benchmarks.md: the quick run's PFLOP is the sum of the committed CPU run's seed-0
    records; the minutes it states follow from that and the assumed speeds; the README's T4 cells
    and the notebook quote the same ranges."""
    text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
    runs = _summary()["runs"]
    flops = {d: sum(by_model[m][0]["train_flops"] for m in by_model) for d, by_model in runs.items()}
    quick = sum(flops.values())
    assert (f"is {quick / 1e15:.2f} PFLOP (the committed CPU run's seed-0 records: {flops['mnist'] / 1e15:.2f} on "
            f"MNIST, {flops['fashion_mnist'] / 1e15:.2f} on Fashion-MNIST, {flops['cifar10'] / 1e15:.2f} on CIFAR-10)") in text
    gpu_cifar = sum(r[0]["train_flops"] for r in _cifar10_runs("reference_gpu").values())
    assert f"({gpu_cifar / 1e15:.1f} on CIFAR-10, from the committed GPU records" in text
    assert "1-4 TFLOP/s for the quarter-width networks" in text and "4-10 TFLOP/s at full width" in text
    low, high = quick / 4e12 / 60, quick / 1e12 / 60
    assert f"That gives {low:.1f}-{high:.0f} minutes for the quick run, 5-15 minutes with" in text
    mnist = (flops["mnist"] / 4e12 / 60, flops["mnist"] / 1e12 / 60)
    assert f"{mnist[0]:.1f}-{mnist[1]:.1f} minutes for MNIST alone (1-3 minutes)" in text
    rows = _time_table()
    t4 = next(c for c in next(iter(rows.values())) if "T4" in c)
    assert rows["python cnn_project.py --preset cpu"][t4] == "5-15 min"
    assert "quickly (5-15 minutes on a T4: an estimate, not measured)" in " ".join(README.read_text().split())
    assert rows["python cnn_project.py --preset cpu --datasets mnist"][t4] == "1-3 min"
    assert rows["python cnn_project.py"][t4].startswith("1-3 h")
    notebook = " ".join("".join(c["source"]) for c in json.loads((ROOT / "colab.ipynb").read_text())["cells"])
    notebook = " ".join(notebook.split())
    assert f"{quick / 1e15:.2f} PFLOP for the quick run" in notebook and "about 5-15 minutes" in notebook


def test_the_disk_cost_of_kept_weights_is_what_the_networks_hold():
    """docs/cnn_project.md: every pair keeps its weights; the cost per dataset and seed is the seven
    networks' fp32 parameters and float buffers at each preset's widths."""
    import cnn_project as cp
    text = " ".join(CNN_DOC.read_text().split())
    for preset, default, stated in (("cpu", 0.25, 23), ("gpu", 1.0, 350)):
        numbers = 0
        for model in cp.MODELS_REGISTRY:
            net = cp.build_model(model, 3, 10, cp.PRESETS[preset]["width"].get(model, default), 32)
            numbers += sum(t.numel() for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
        assert abs(numbers * 4 / 1e6 - stated) / stated < 0.05, (preset, numbers)
        assert f"about {stated} MB" in text


def test_nlp_doc_sentiment_table_matches_the_committed_measurement():
    """docs/nlp_project.md's by-prompt sentiment table and its quoted page line come from
    results/nlp/sentiment_by_prompt.json (eval-sentiment), row by row."""
    report = json.loads((ROOT / "results" / "nlp" / "sentiment_by_prompt.json").read_text())
    flat = " ".join((ROOT / "docs" / "nlp_project.md").read_text().split())
    rows = {"few-shot, plain": "three worked examples (few-shot), top label",
            "few-shot, calibrated": "few-shot, calibrated, top label",
            "instruction, plain": "an instruction in a chat message, first-token probabilities",
            "instruction, calibrated": "the instruction, calibrated"}
    for name, words in rows.items():
        result = report["results"][name]
        kinds = result["per_kind"]
        assert (f"| {words} | {round(result['accuracy'] * result['n'])} | {kinds['plain'][0]} | "
                f"{kinds['sarcasm'][0]} | {kinds['mixed'][0]} |") in flat, name
    page = report["results"][report["app_default"]]
    kinds, right = page["per_kind"], round(page["accuracy"] * page["n"])
    assert (f"**{right} ({page['accuracy']:.0%})** | {kinds['plain'][0]} | {kinds['sarcasm'][0]} | "
            f"{kinds['mixed'][0]} |") in flat
    assert (f"on {page['n']} labelled sentences this verdict was right for {right} ({page['accuracy']:.0%}): "
            f"{kinds['plain'][0]} of {kinds['plain'][1]} plain ones, {kinds['sarcasm'][0]} of {kinds['sarcasm'][1]} "
            f"sarcastic ones, {kinds['mixed'][0]} of {kinds['mixed'][1]} mixed reviews") in flat
    assert f"{report['wall_s'] // 60:.0f} min {report['wall_s'] % 60:.0f} s of wall time" in flat


def test_nlp_doc_browser_speed_tables_match_the_committed_runs():
    """docs/nlp_project.md's browser-speed tables (the browser on its own core and on the app's cores, and before
    the speed changes) are the committed runs of benchmarks/nlp_browser_benchmark.py, turn by turn."""
    flat = (ROOT / "docs" / "nlp_project.md").read_text()
    for name in ("browser_chat_speed_smollm2.json", "browser_chat_speed_smollm2_browser_core.json",
                 "browser_chat_speed_smollm2_before.json"):
        report = json.loads((ROOT / "results" / "nlp" / name).read_text())
        assert report["cpu"].startswith("AMD EPYC") and report["repeats"] == (3 if "before" in name else 5)
        if "before" not in name:  # a learner reads a reply before answering it
            assert report["read_s"] == 1.0 and "each message sent 1 s after the reply before it ended" in " ".join(flat.split())
        for turn in range(1, 6):
            row = report["summary"][f"turn {turn}"]
            d, f = row["decode_ratio"], row["ttft_ratio"]
            server = row["app"].get("server_ttft_s")  # the newer run also gives the app's share in the server
            assert (f"| {turn} | {d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) | "
                    f"{row['app']['decode_tokens_per_s']:.1f} and {row['direct']['decode_tokens_per_s']:.1f} | "
                    f"{f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f}) | {row['app']['ttft_s'] * 1000:.0f} and "
                    f"{row['direct']['ttft_s'] * 1000:.0f} ms |" + (f" {server * 1000:.0f} ms |" if server else "")
                    ) in flat, (name, turn)


def test_what_the_committed_cifar10_inspection_shows_is_what_its_csvs_hold():
    """docs/cnn_project.md's reading of the committed CIFAR-10 inspection: ECE range, mean corrupted
    accuracy, GoogLeNet's ties, AlexNet under the strongest noise, the strongest contrast range."""
    import csv
    text = " ".join(CNN_DOC.read_text().split())
    folder = ROOT / "results" / "reference_cpu"
    summary = {r["model"]: r for r in csv.DictReader(open(folder / "cnn_summary.csv"))
               if r["dataset"] == "cifar10"}
    ece = {m: 100 * float(r["test_ece_mean"]) for m, r in summary.items()}
    assert min(ece, key=ece.get) == "GoogLeNet" and max(ece, key=ece.get) == "LeNet-5"
    assert (f"ECE ranges from {ece['GoogLeNet']:.1f}% (GoogLeNet) to {ece['LeNet-5']:.1f}% (LeNet-5)"
            in text)
    kept = {m: 100 * float(summary[m]["corrupted_accuracy"]) for m in ("ResNet-18", "GoogLeNet")}
    assert f"ResNet-18 keeps {kept['ResNet-18']:.1f}% and GoogLeNet {kept['GoogLeNet']:.1f}%" in text
    assert "tied with the best in 10 of 12" in summary["GoogLeNet"]["corrupted_verdicts"]
    rows = [r for r in csv.DictReader(open(folder / "cnn_robustness.csv"))
            if r["dataset"] == "cifar10" and r["severity"] == "3"]
    noise = {r["model"]: 100 * float(r["accuracy"]) for r in rows if r["corruption"] == "gaussian noise"}
    assert min(noise, key=noise.get) == "AlexNet"
    assert f"{noise['AlexNet']:.1f}% at the strongest, against {noise['ResNet-18']:.1f}%" in text
    contrast = [100 * float(r["accuracy"]) for r in rows if r["corruption"] == "contrast"]
    assert len(contrast) == 7 and f"{min(contrast):.1f}-{max(contrast):.1f}%" in text


def test_every_seed0_pair_of_the_reference_run_has_its_weights():
    """All 21 seed-0 pairs of results/reference_cpu keep weights in git, as the docs say; a pair whose weights
    were added later says how they were checked (the record's 10,000 test predictions, image by image)."""
    folder = ROOT / "results" / "reference_cpu" / "cnn"
    records = sorted(p for p in folder.glob("*/*.pkl") if ".seed" not in p.name)
    assert len(records) == 21
    for path in records:
        assert path.with_suffix(".safetensors").is_file(), path
        restored = pickle.loads(path.read_bytes()).get("restored_weights")
        assert restored is None or "the same 10000 test predictions" in restored["check"], path
    assert "All 21 pairs have them now." in " ".join(CNN_DOC.read_text().split())


def test_what_the_committed_mnist_robustness_shows_is_what_its_csvs_hold():
    """docs/cnn_project.md's MNIST robustness lesson: the best clean model keeps the least under corruptions
    and LeNet-5 the most, with the quoted accuracies (and the Fashion-MNIST figures beside them)."""
    import csv
    text = " ".join(CNN_DOC.read_text().split())
    folder = ROOT / "results" / "reference_cpu"
    summary = {(r["dataset"], r["model"]): 100 * float(r["corrupted_accuracy"])
               for r in csv.DictReader(open(folder / "cnn_summary.csv"))}
    mnist = {m: a for (d, m), a in summary.items() if d == "mnist"}
    assert min(mnist, key=mnist.get) == "ResNet-18" and max(mnist, key=mnist.get) == "LeNet-5"
    assert (f"keeps only {mnist['ResNet-18']:.1f}% on average over the 12 damaged copies, the least of the seven, "
            f"while LeNet-5, the worst on clean digits, keeps the most: {mnist['LeNet-5']:.1f}%") in text
    assert f"SE-ResNet-18 is the next most fragile ({mnist['SE-ResNet-18']:.1f}%)" in text
    fashion = {m: summary[("fashion_mnist", m)] for m in ("ResNet-18", "SE-ResNet-18", "LeNet-5")}
    assert (f"(ResNet-18 {fashion['ResNet-18']:.1f}%, SE-ResNet-18 {fashion['SE-ResNet-18']:.1f}%, LeNet-5 "
            f"{fashion['LeNet-5']:.1f}%)") in text
    acc = {(r["model"], r["corruption"], r["severity"]): 100 * float(r["accuracy"])
           for r in csv.DictReader(open(folder / "cnn_robustness.csv")) if r["dataset"] == "mnist"}
    assert (f"falls to {acc['ResNet-18', 'gaussian noise', '3']:.1f}% while LeNet-5 keeps "
            f"{acc['LeNet-5', 'gaussian noise', '3']:.1f}%") in text
    assert (f"at 40% of the contrast it is at {acc['ResNet-18', 'contrast', '2']:.1f}%, no better than guessing, "
            f"where LeNet-5 keeps {acc['LeNet-5', 'contrast', '2']:.1f}%") in text


def test_docs_list_the_published_figures_the_chat_shows():
    """The docs' table of published figures is the one the app shows beside unmeasured models' replies."""
    import nlp_project

    docs = (ROOT / "docs" / "nlp_project.md").read_text()
    for name, (figures, source) in nlp_project.PUBLISHED_SCORES.items():
        assert f"| {name} | {figures} |" in docs, name
        assert ("model card" in source) == (f"| {name} | {figures} | its model card" in docs), name
