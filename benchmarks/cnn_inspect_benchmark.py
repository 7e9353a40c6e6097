"""How long `cnn_project.py --inspect` computes for the 21 pairs of a CPU-preset run (7 models x
MNIST, Fashion-MNIST, CIFAR-10), without needing their weights: every network is built at the
preset's width with random weights (the compute does not depend on the weights' values) and put
through what --inspect computes per pair: Grad-CAM of CAM_IMAGES images, one image's stage maps, and
the predictions on the CORRUPTION_IMAGES subset under the 12 corrupted copies (made once per
dataset). Reading the test set, the libraries' imports and the drawing are timed apart.

    python benchmarks/cnn_inspect_benchmark.py                 # all 21 pairs
    python benchmarks/cnn_inspect_benchmark.py --models lenet5 resnet --images 500

The first run of --inspect on a results folder costs about this plus reading each dataset once,
the imports and the drawing; a rerun draws from the cache (seconds).

Evidence (2 AMD EPYC cores, torch 2.14.1, bf16 autocast, 2026-12-07, one run): 323 s for the 21
pairs at 5,000 images (GoogLeNet 32-42 s a pair, Xception 20-29 s, LeNet-5 1.4-1.7 s). The same
day, `--inspect` on a copy of results/reference_cpu, which then kept weights for 3 pairs
(mnist/senet, fashion_mnist/resnet, cifar10/googlenet), took 1 min 43 s from an empty cache and
11.5 s again from the cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cnn_project as cp  # noqa: E402

SHAPES = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32)}


def time_pair(model: str, dataset: str, corrupted: dict, cam_x: torch.Tensor) -> float:
    """Seconds for one pair's Grad-CAM, stage maps and corrupted predictions (random weights)."""
    channels, side = SHAPES[dataset]
    spec = cp.DATASETS[dataset]
    width = cp.budget("cpu", dataset, model)[1]
    net = cp.build_model(model, channels, 10, width, side).eval()
    t0 = time.perf_counter()
    cp.explain(net, model, spec, cam_x)
    cp.stage_maps(net, model, spec, cam_x[:1])
    for x in corrupted.values():
        cp.predicted_labels(net, x, spec)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(cp.MODELS_REGISTRY))
    p.add_argument("--datasets", nargs="+", default=list(SHAPES))
    p.add_argument("--images", type=int, default=cp.CORRUPTION_IMAGES)
    args = p.parse_args()
    t0 = time.perf_counter()
    import captum.attr  # noqa: F401
    import torchmetrics  # noqa: F401
    print(f"imports (captum, torchmetrics): {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, bf16 autocast: {cp.choose_precision('auto', True)[0] == 'bf16'}")
    total = 0.0
    for dataset in args.datasets:
        channels, side = SHAPES[dataset]
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (args.images, channels, side, side), dtype=torch.uint8, generator=g)
        t0 = time.perf_counter()
        corrupted = cp.corrupted_sets(x)
        made = time.perf_counter() - t0
        print(f"{dataset}: {len(corrupted)} corrupted copies of {args.images} images in {made:.1f} s")
        total += made
        for model in args.models:
            seconds = time_pair(model, dataset, corrupted, x[:cp.CAM_IMAGES])
            total += seconds
            print(f"  {model:<10} {seconds:6.1f} s", flush=True)
    print(f"total: {total:.0f} s ({total / 60:.1f} min) for {len(args.datasets) * len(args.models)} pairs, "
          f"without reading the data and drawing")


if __name__ == "__main__":
    main()
