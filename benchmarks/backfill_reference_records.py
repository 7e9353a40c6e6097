"""Add two fields that newer versions of cnn_project.py write to records made before them.

    python benchmarks/backfill_reference_records.py --results-dir results/reference_cpu --data-dir DATA

1. test["labels"]: every test image's true label, in the order of the record's test["predictions"],
   read from the same data the run used (its split seed). The paired tests (McNemar, bootstrap)
   need them. Checked: the predictions scored against these labels must give the record's own test
   accuracy exactly, else the script stops and changes nothing.
2. confidence_threshold (only for runs whose weights file is in the folder): --predict's low-confidence rule,
   computed as the program does at the end of training (cnn_project.confidence_threshold), on the
   run's own validation split, with the kept (validation-chosen) weights. Autocast uses the
   record's precision; on a CPU without native bf16 the bf16 record is emulated, so its threshold
   can differ in the last digits from one computed on the training machine.

Each changed record says so in record["backfilled"] (fields, UTC time, this script). Records that
already have both fields are left alone. Writes are atomic (cnn_project.save_pickle).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cnn_project as cp  # noqa: E402


def backfill(results_dir: Path, data_dir: str, cache_dir: str | None) -> int:
    """Backfill every record under results_dir; returns how many were changed."""
    changed, splits = 0, {}
    runs = cp.collect_runs(results_dir)
    for dataset, by_model in runs.items():
        for model, by_seed in by_model.items():
            for seed, record in by_seed.items():
                test = record.get("test")
                wants_rule = (cp.weights_path(results_dir, dataset, model, seed).is_file()
                              and not record.get("confidence_threshold"))
                if test is None or ("labels" in test and not wants_rule):
                    continue
                spec = cp.spec_of(record)
                if (dataset, seed) not in splits:
                    splits[dataset, seed] = cp.load_splits(
                        spec, data_dir, seed, record["config"]["val_size"], record["config"]["subset"],
                        cp.torch.device("cpu"), cache_dir=cache_dir)
                data = splits[dataset, seed]
                labels = data.test_y.numpy()
                accuracy = float((test["predictions"].astype(np.int64) == labels).mean())
                if len(labels) != len(test["predictions"]) or abs(accuracy - test["accuracy"]) > 1e-6:
                    raise SystemExit(f"{dataset}/{model} seed {seed}: these labels give accuracy "
                                     f"{accuracy:.4%}, the record says {test['accuracy']:.4%}: not the "
                                     f"data it was tested on; nothing changed")
                fields = []
                if "labels" not in test:
                    test["labels"] = labels.astype(test["predictions"].dtype)
                    fields.append("test.labels")
                if wants_rule:
                    accelerator = cp.make_accelerator("cpu", record["config"]["precision"])
                    net = cp.load_trained(results_dir, dataset, model, seed)
                    record["confidence_threshold"] = cp.confidence_threshold(
                        net, data, spec, record["config"], accelerator)
                    fields.append("confidence_threshold")
                record["backfilled"] = {"fields": fields, "utc": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
                                        "by": "benchmarks/backfill_reference_records.py"}
                cp.save_pickle(record, cp.result_path(results_dir, dataset, model, seed))
                print(f"{dataset}/{model} seed {seed}: added {', '.join(fields)} (test accuracy "
                      f"{accuracy:.2%} reproduced from the labels)", flush=True)
                changed += 1
    return changed


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "cnn_project"))
    a = p.parse_args()
    print(f"{backfill(Path(a.results_dir), a.data_dir, a.cache_dir)} records changed")
