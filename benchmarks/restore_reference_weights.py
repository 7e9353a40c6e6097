"""Give every seed-0 pair of a committed run its weights back, by training it again and checking it.

    python benchmarks/restore_reference_weights.py --results-dir results/reference_cpu \
        --scratch /tmp/retrain --data-dir DATA [--train]

A committed run keeps each pair's record (.pkl); some of its weights files (.safetensors) were
never kept. Training is seeded, so training a pair again with the record's own settings (preset,
seed 0, precision) on the same software gives the same network. This script

1. with --train: trains the seed-0 pairs that lack weights into --scratch, with cnn_project.py and
   the record's preset (a pair already trained there with the same settings is skipped, so an
   interrupted --train resumes);
2. for each such pair trained in --scratch, checks that the new record has the same settings (for
   an image folder, the same content hash: the run's data key also hashes file times) and the same 10,000 (or however many) test predictions as the committed record, image by image;
3. only then writes the weights beside the committed record, atomically, with the committed
   record's settings in their metadata (an image folder's data key differs), and adds to that record
   the --predict rule computed at the end of the new training (confidence_threshold: the same
   network on the same validation split), noting it in record["restored_weights"].

A pair whose predictions differ is reported with the number of differing images and left alone:
its weights would not be the network the record describes (a different CPU's bf16 kernels or a
different torch can do that; then the run has to be regenerated instead).
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cnn_project as cp  # noqa: E402


def missing_pairs(results_dir: Path) -> dict:
    """{dataset: [model, ...]} of the seed-0 records under results_dir that have no weights file."""
    missing = {}
    for dataset, by_model in cp.collect_runs(results_dir).items():
        for model, by_seed in by_model.items():
            if 0 in by_seed and not cp.weights_path(results_dir, dataset, model, 0).is_file():
                missing.setdefault(dataset, []).append(model)
    return missing


def train_missing(results_dir: Path, scratch: Path, data_dir: str, missing: dict) -> None:
    """Train each dataset's missing pairs into scratch with the committed records' preset."""
    for dataset, models in missing.items():
        record = cp.load_result(cp.result_path(results_dir, dataset, models[0], 0))
        command = [sys.executable, str(ROOT / "cnn_project.py"), "--preset", record["config"]["preset"],
                   "--precision", record["config"]["precision"], "--datasets", dataset,
                   "--models", *models, "--data-dir", data_dir, "--results-dir", str(scratch),
                   "--no-progress"]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def same_network(old: dict, new: dict) -> str | None:
    """None when new (a retrained record) reproduces old; else one line saying how it differs."""
    def settings(record):  # an image folder's data key hashes file times: compare its content hash
        data = record.get("data") or {}
        return {**cp.settings_of(record), "data": (data.get("source") or {}).get("sha256") or
                record["config"].get("data")}
    if settings(old) != settings(new):
        return "its settings (or its data's content) differ from the committed record's"
    a, b = old["test"]["predictions"], new["test"]["predictions"]
    if len(a) != len(b):
        return f"it was tested on {len(b)} images, the committed record on {len(a)}"
    differ = int((np.asarray(a) != np.asarray(b)).sum())
    return f"{differ} of {len(a)} test predictions differ" if differ else None


def restore(results_dir: Path, scratch: Path, missing: dict) -> int:
    """Copy the checked weights of every reproduced pair; returns how many pairs were restored."""
    restored = 0
    for dataset, models in missing.items():
        for model in models:
            name = f"{dataset}/{model}"
            new_path = cp.result_path(scratch, dataset, model, 0)
            source = cp.weights_path(scratch, dataset, model, 0)
            if not (new_path.is_file() and source.is_file()):
                print(f"{name}: not trained in {scratch} yet; run with --train", flush=True)
                continue
            old, new = (cp.load_result(cp.result_path(results_dir, dataset, model, 0)),
                        cp.load_result(new_path))
            problem = same_network(old, new)
            if problem:
                print(f"{name}: NOT restored: {problem}", flush=True)
                continue
            # the same tensors, under the committed record's settings (save_weights is atomic)
            cp.save_weights(cp.weights_path(results_dir, dataset, model, 0), load_file(source), old)
            old["confidence_threshold"] = new["confidence_threshold"]
            old["restored_weights"] = {
                "utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                "by": "benchmarks/restore_reference_weights.py",
                "check": f"seed 0 trained again: the same {len(old['test']['predictions'])} test "
                         f"predictions, image by image", "torch": new["versions"]["torch"]}
            cp.save_pickle(old, cp.result_path(results_dir, dataset, model, 0))
            print(f"{name}: restored ({len(old['test']['predictions'])} test predictions identical, "
                  f"test accuracy {old['test']['accuracy']:.2%})", flush=True)
            restored += 1
    return restored


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", required=True, type=Path, help="the committed run")
    p.add_argument("--scratch", required=True, type=Path, help="where the pairs are trained again")
    p.add_argument("--data-dir", required=True, help="the datasets, as for cnn_project.py")
    p.add_argument("--train", action="store_true", help="train the missing pairs first")
    a = p.parse_args()
    todo = missing_pairs(a.results_dir)
    print(f"seed-0 pairs without weights: {sum(map(len, todo.values()))}", flush=True)
    if a.train:
        train_missing(a.results_dir, a.scratch, a.data_dir, todo)
    print(f"{restore(a.results_dir, a.scratch, todo)} pairs restored", flush=True)
