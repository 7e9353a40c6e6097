"""Training throughput of cnn_project.py against the seeds' pipeline, a naive pipeline and the
machine's own matmul limit; and time-to-accuracy on the real MNIST / Fashion-MNIST.

    python benchmarks/cnn_benchmark.py                                  # every model x shape x pipeline
    python benchmarks/cnn_benchmark.py --models lenet5 resnet --seconds 5
    python benchmarks/cnn_benchmark.py --tiny                           # CI: a few batches, two models
    python benchmarks/cnn_benchmark.py --time-to-accuracy --data-dir data
    python benchmarks/cnn_benchmark.py --variants fp32 compile batch512 --models lenet5 resnet vgg

Pipelines, per architecture and input shape (1x28x28 MNIST-like, 3x32x32 CIFAR-like):
  ours   the trainer's own step (the body of cnn_project.fit's batch loop): uint8 tensors in memory,
         batched augmentation, bf16 autocast (CPU and recent GPUs), channels_last, SGD (fused on GPUs).
  naive  the same model and recipe fed the textbook way: a torchvision-style dataset that makes a PIL
         image per item, ToTensor + Normalize, DataLoader (default workers), fp32, NCHW.
  seeds  the pipeline of the scripts this project started from: PIL Resize(224), ToTensor, 1 -> 3 channel repeat, ImageNet
         Normalize, DataLoader batch 32, fp32, around a LeNet-5 built for 3x224x224 (SeedsLeNet5)
         and around our models where a 224 px step fits in the time budget.
FLOPs per training image (forward + backward) are counted by cnn_project.count_flops (torch.utils.flop_counter)
(convolutions and matmuls; elementwise work is not counted, as usual for MFU). MFU = achieved
FLOP/s / the dense matmul FLOP/s this machine reaches in the same precision, measured in the same run.
The images are random uint8 (speed does not depend on pixel values), except that the naive and
seeds' pipelines read the real MNIST through torchvision when --data-dir holds it.

Evidence (2 AMD EPYC cores, no GPU, torch 2.14.1, 2026-11-22; full tables in docs/benchmarks.md and
results/benchmarks/): ours trains 180x the seeds' LeNet-5 pipeline and 1.9-3.6x the naive one; ResNet-18
and VGG-16-BN reach 79-83% MFU in bf16; Fashion-MNIST 93% validation in 204-245 s of training over 3
seeds (VGG 0.25); MNIST 99.5% validation on 1 seed of 3, at 121 s.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cnn_project as cp  # noqa: E402  (the trainer being measured)

# =============================================================================================
# CONFIG
# =============================================================================================

SHAPE_SPECS = {"1x28x28": "mnist", "3x32x32": "cifar10"}  # input shape -> DatasetSpec it borrows
BENCH = dict(
    batch_size=256,        # images per step for ours and naive (the recipe's batch)
    seeds_batch_size=32,   # the seeds' DataLoader batch
    warmup_steps=2,        # untimed steps first (allocator, oneDNN/cuDNN plans, compilation)
    min_steps=3,           # at least this many timed steps ...
    seconds=8.0,           # ... and at least this many seconds per measurement
    max_steps=200,         # then stop
    width=1.0,             # width multiplier of our models (1.0 = the papers' channel counts)
    peak_size=2048,        # square matmul side for the machine's peak FLOP/s
)
# Variants of our pipeline, for before/after figures of what was tried (--variants).
# "auto-no-bf16" is --precision auto as it runs on a CPU without native bf16 (AVX2-only laptops):
# the capability probe is faked to say so, and auto must then train at fp32 ("fp32") speed.
VARIANTS = {
    "ours": dict(precision="auto", compile=False, batch_size=None, fused=None),
    "auto-no-bf16": dict(precision="auto", compile=False, batch_size=None, fused=None, no_bf16=True),
    "fp32": dict(precision="no", compile=False, batch_size=None, fused=None),
    "compile": dict(precision="auto", compile=True, batch_size=None, fused=None),
    "fused": dict(precision="auto", compile=False, batch_size=None, fused=True),
    "unfused": dict(precision="auto", compile=False, batch_size=None, fused=False),
    "batch512": dict(precision="auto", compile=False, batch_size=512, fused=None),
    "batch128": dict(precision="auto", compile=False, batch_size=128, fused=None),
}
# Time-to-accuracy runs: validation target in [0, 1], model, epochs of the one-cycle schedule, width;
# batch size and peak lr are the recipe's (cnn_project.RECIPE). VGG-16-BN at quarter width was the
# fastest of the seven to both targets in the CPU grid (results/cnn). Other schedules tried are
# listed in docs/benchmarks.md. The --tta-* flags override any field, and --tta-seeds repeats each run.
TIME_TO_ACCURACY = [
    dict(dataset="mnist", target=0.995, model="vgg", epochs=5, width=0.25),
    dict(dataset="fashion_mnist", target=0.93, model="vgg", epochs=11, width=0.25),
]

CSV_COLUMNS = ["model", "architecture", "input_shape", "pipeline", "precision", "batch_size",
               "width", "images_per_s", "ours_speedup", "train_gflop_per_image", "achieved_tflop_s",
               "peak_tflop_s", "mfu", "steps_timed", "seconds_timed", "device", "torch", "threads"]


# =============================================================================================
# MACHINE PEAK AND FLOPS
# =============================================================================================

def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    """Dense square matmul throughput in TFLOP/s (2*size^3 FLOPs per product)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
        sync(device)
    return 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e12


def machine_peak_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """The machine's dense matmul limit in one precision: the best of sides `size` and 2*`size`."""
    return max(matmul_tflops(device, dtype, side) for side in (size, 2 * size))


class SeedsLeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) as the seeds' pipeline needs it for 3x224x224 input: conv5x5(6),
    pool, conv5x5(16), pool, then 16x53x53 -> 120 -> 84 -> num_classes. Input N x 3 x 224 x 224."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 53 * 53, 120), nn.ReLU(),
                                        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# =============================================================================================
# PIPELINES
# =============================================================================================

def timed_steps(step, device: torch.device, images_per_step: int, cfg: dict) -> dict:
    """Run `step()` warmup_steps times untimed, then until min_steps and `seconds` are both reached
    (or max_steps). Returns images/s, steps and seconds timed."""
    for _ in range(cfg["warmup_steps"]):
        step()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while n < cfg["max_steps"] and (n < cfg["min_steps"] or time.perf_counter() - t0 < cfg["seconds"]):
        step()
        n += 1
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"images_per_s": n * images_per_step / elapsed, "steps_timed": n, "seconds_timed": elapsed}


def run_ours(model_name: str, shape_name: str, cfg: dict, device: str, variant: str) -> dict:
    """Our trainer's step on random uint8 data held on the device: what cnn_project.fit does to each
    batch (augment, normalise, forward under autocast, loss, backward, SGD step, schedule step), with
    the trainer's own functions and objects; fit's running loss and accuracy sums are left out."""
    v = VARIANTS[variant]
    spec = cp.DATASETS[SHAPE_SPECS[shape_name]]
    real_probe = cp.cpu_bf16_support
    if v.get("no_bf16"):
        cp.cpu_bf16_support = lambda: ""
    try:
        accelerator = cp.make_accelerator(device, v["precision"])
    finally:
        cp.cpu_bf16_support = real_probe
    dev = accelerator.device
    batch = v["batch_size"] or cfg["batch_size"]
    torch.manual_seed(0)
    model = cp.build_model(model_name, spec.in_channels, 10, cfg["width"], spec.image_size)
    model = model.to(dev, memory_format=torch.channels_last)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    flops = cp.count_flops(model, shape, backward=True)
    optimizer, scheduler = cp.make_optimizer(model, dict(cp.RECIPE), total_steps=10 ** 6,
                                            fused=v["fused"])
    model, optimizer = accelerator.prepare(model, optimizer)
    if v["compile"]:
        model = torch.compile(model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cp.RECIPE["label_smoothing"])
    n = batch * 8
    x = torch.randint(0, 256, (n, spec.in_channels, spec.image_size, spec.image_size),
                      dtype=torch.uint8, device=dev)
    y = torch.randint(0, 10, (n,), device=dev)
    generator = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, n, (batch,), generator=generator).to(dev)
        images = cp.normalize(cp.augment(x[idx], spec, generator), spec)
        with accelerator.autocast():
            loss = criterion(model(images).float(), y[idx])
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()

    out = timed_steps(step, dev, batch, cfg)
    base = accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32"
    label = base + (" (auto, no native bf16)" if v.get("no_bf16") else "") \
        + ("+compile" if v["compile"] else "") + {None: "", True: "+fused-sgd",
                                                           False: "+default-sgd"}[v["fused"]]
    return dict(out, precision=label, batch_size=batch, flops=flops, device=dev, precision_key=base)


class PILDataset(torch.utils.data.Dataset):
    """What torchvision's MNIST/CIFAR10 __getitem__ does: one PIL image per item, then `transform`.
    images: uint8 N x H x W (grey) or N x H x W x 3."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def pil_dataset(shape_name: str, transform, data_dir: str | None):
    """The real MNIST through torchvision when `data_dir` has it (1x28x28), else random images."""
    import torchvision
    if shape_name == "1x28x28" and data_dir:
        try:
            return torchvision.datasets.MNIST(data_dir, train=True, transform=transform)
        except RuntimeError:
            pass
    rng = np.random.default_rng(0)
    shape = (4096, 28, 28) if shape_name == "1x28x28" else (4096, 32, 32, 3)
    return PILDataset(rng.integers(0, 256, shape, dtype=np.uint8),
                      rng.integers(0, 10, 4096), transform)


def run_dataloader(model: nn.Module, shape_name: str, transform, batch: int, cfg: dict,
                   data_dir: str | None, dev: torch.device, input_shape: tuple) -> dict:
    """Train `model` in fp32 NCHW from a DataLoader over per-image PIL transforms, on `dev`."""
    dataset = pil_dataset(shape_name, transform, data_dir)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    flops = cp.count_flops(model, input_shape, backward=True)
    model = model.to(dev).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    batches = iter(loader)

    def step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(dev), y.to(dev)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    out = timed_steps(step, dev, batch, cfg)
    return dict(out, precision="fp32", batch_size=batch, flops=flops, device=dev,
                precision_key="fp32")


def naive_transform(spec):
    from torchvision import transforms
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])


def seeds_transform():
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(224), transforms.ToTensor(),
        transforms.Lambda(lambda t: t.repeat(3, 1, 1) if t.shape[0] == 1 else t),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


# =============================================================================================
# THROUGHPUT TABLE
# =============================================================================================

def throughput(args) -> list:
    """Measure every (model, shape, pipeline); return CSV rows (one per measurement)."""
    cfg = dict(BENCH, seconds=args.seconds, width=args.width, batch_size=args.batch_size,
               warmup_steps=args.warmup_steps, min_steps=args.min_steps)
    dev = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    peak = {"bf16": machine_peak_tflops(dev, torch.bfloat16, args.peak_size),
            "fp32": machine_peak_tflops(dev, torch.float32, args.peak_size)}
    peak["fp16"] = machine_peak_tflops(dev, torch.float16, args.peak_size) if dev.type == "cuda" else peak["bf16"]
    print(f"device {dev}, torch {torch.__version__}, {torch.get_num_threads()} threads; dense matmul "
          f"peak {peak['bf16']:.3f} TFLOP/s bf16, {peak['fp32']:.3f} TFLOP/s fp32", flush=True)
    rows = []
    for shape_name in args.shapes:
        spec = cp.DATASETS[SHAPE_SPECS[shape_name]]
        in_shape = (spec.in_channels, spec.image_size, spec.image_size)
        for model_name in args.models:
            results = []
            for variant in args.variants:
                results.append((variant, run_ours(model_name, shape_name, cfg, args.device, variant)))
            if "naive" in args.pipelines:
                torch.manual_seed(0)
                model = cp.build_model(model_name, spec.in_channels, 10, cfg["width"], spec.image_size)
                results.append(("naive", run_dataloader(model, shape_name, naive_transform(spec),
                                                        cfg["batch_size"], cfg, args.data_dir,
                                                        dev, in_shape)))
            if "seeds" in args.pipelines and shape_name == "1x28x28":
                torch.manual_seed(0)
                seeds_models = [("seeds", SeedsLeNet5())] if model_name == "lenet5" else []
                if model_name in args.seeds_models and model_name != "lenet5":
                    seeds_models.append(("seeds", cp.build_model(model_name, 3, 10, cfg["width"], 224)))
                slow = dict(cfg, warmup_steps=min(cfg["warmup_steps"], 1), min_steps=min(cfg["min_steps"], 2))
                for label, model in seeds_models:  # seconds per step at 224 px: fewer steps
                    results.append((label, run_dataloader(
                        model, shape_name, seeds_transform(), cfg["seeds_batch_size"], slow,
                        args.data_dir, dev, (3, 224, 224))))
            ours_ips = results[0][1]["images_per_s"]
            for pipeline, r in results:
                achieved = r["images_per_s"] * r["flops"] / 1e12
                row = {"model": model_name, "architecture": cp.MODELS_REGISTRY[model_name][0],
                       "input_shape": shape_name if pipeline != "seeds" else "3x224x224 (from 1x28x28)",
                       "pipeline": pipeline, "precision": r["precision"], "batch_size": r["batch_size"],
                       "width": cfg["width"] if not (pipeline == "seeds" and model_name == "lenet5") else 1.0,
                       "images_per_s": r["images_per_s"], "ours_speedup": ours_ips / r["images_per_s"],
                       "train_gflop_per_image": r["flops"] / 1e9, "achieved_tflop_s": achieved,
                       "peak_tflop_s": peak[r["precision_key"]], "mfu": achieved / peak[r["precision_key"]],
                       "steps_timed": r["steps_timed"], "seconds_timed": r["seconds_timed"],
                       "device": str(r["device"]), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}
                rows.append(row)
                print(f"{row['architecture']:>13} {row['input_shape']:>24} {pipeline:>9} "
                      f"{row['precision']:>13} b{row['batch_size']:<4} {row['images_per_s']:>9.1f} img/s "
                      f"x{row['ours_speedup']:>7.1f}  {row['train_gflop_per_image']:8.4f} GFLOP/img "
                      f"MFU {row['mfu']:6.1%}", flush=True)
    return rows


def plot(rows: list, path: Path) -> None:
    """Bar chart of images/s (log scale): one panel per input shape, bars per pipeline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = [s for s in SHAPE_SPECS if any(r["input_shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["input_shape"] == shape
               or (shape == "1x28x28" and r["pipeline"] == "seeds")]
        models = list(dict.fromkeys(r["architecture"] for r in sub))
        pipelines = list(dict.fromkeys(r["pipeline"] for r in sub))
        w = 0.8 / len(pipelines)
        for j, p in enumerate(pipelines):
            vals = [next((r["images_per_s"] for r in sub if r["architecture"] == m and r["pipeline"] == p),
                         0.0) for m in models]
            ax.bar(np.arange(len(models)) + (j - (len(pipelines) - 1) / 2) * w, vals, w,
                   label=p if p != "seeds" else "seeds (224 px, batch 32)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_ylabel("training images / s")
        ax.set_title(f"{shape} input")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Training throughput, {rows[0]['device']}, {rows[0]['threads']} threads, "
                 f"torch {rows[0]['torch']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =============================================================================================
# TIME TO ACCURACY
# =============================================================================================

def time_to_accuracy(args) -> list:
    """Train with cnn_project.train_one on the real data until the validation accuracy first
    reaches the target, once per seed; report training seconds (evaluation excluded), wall seconds,
    and the test accuracy of that checkpoint. Returns CSV-ready rows (one per run and seed)."""
    rows = []
    for run in TIME_TO_ACCURACY:
        if run["dataset"] not in args.tta_datasets:
            continue
        run = dict(run, batch_size=cp.RECIPE["batch_size"], lr=cp.RECIPE["lr"])
        for key in ("model", "epochs", "width", "batch_size", "lr"):
            if getattr(args, f"tta_{key}") is not None:
                run[key] = getattr(args, f"tta_{key}")
        spec = cp.DATASETS[run["dataset"]]
        cfg = dict(cp.RECIPE, batch_size=run["batch_size"], lr=run["lr"])
        for seed in args.tta_seeds:
            accelerator = cp.make_accelerator(args.device, "auto")
            # The seed also draws the validation split, as in cnn_project.py --seed.
            data = cp.load_splits(spec, args.data_dir, seed, cfg["val_size"], args.subset,
                                  accelerator.device)
            t0 = time.perf_counter()
            record, _ = cp.train_one(run["model"], spec, data, run["epochs"], run["width"], cfg,
                                  accelerator, seed=seed, show_progress=False,
                                  stop_at_val_accuracy=run["target"])
            wall = time.perf_counter() - t0
            h = record["history"]
            reached = next((i for i, a in enumerate(h["val_accuracy"]) if a >= run["target"]), None)
            row = {"dataset": run["dataset"], "model": run["model"], "width": run["width"],
                   "epochs_planned": run["epochs"], "batch_size": run["batch_size"], "lr": run["lr"],
                   "seed": seed, "target_val_accuracy": run["target"], "reached": reached is not None,
                   "epochs_run": len(h["epoch"]),
                   "train_seconds_to_target": (sum(h["epoch_time_s"][:reached + 1])
                                               if reached is not None else math.nan),
                   "train_seconds": sum(h["epoch_time_s"]), "wall_seconds": wall,
                   "val_accuracy": h["val_accuracy"][-1],
                   "test_accuracy": record["test"]["accuracy"] if record["test"] else math.nan,
                   "device": str(accelerator.device), "torch": torch.__version__}
            rows.append(row)
            print(f"time to {run['target']:.1%} val on {run['dataset']} (seed {seed}): "
                  f"{row['train_seconds_to_target']:.1f} s of training ({run['model']} width "
                  f"{run['width']}, batch {run['batch_size']}, lr {run['lr']}, {row['epochs_run']}/"
                  f"{run['epochs']} epochs, {row['train_seconds']:.1f} s trained, wall {wall:.1f} s), "
                  f"val {row['val_accuracy']:.2%}, test {row['test_accuracy']:.2%}", flush=True)
    return rows


# =============================================================================================
# CLI
# =============================================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(cp.MODELS_REGISTRY), choices=list(cp.MODELS_REGISTRY))
    p.add_argument("--shapes", nargs="+", default=list(SHAPE_SPECS), choices=list(SHAPE_SPECS))
    p.add_argument("--pipelines", nargs="*", default=["naive", "seeds"], choices=["naive", "seeds"],
                   help="pipelines measured besides ours")
    p.add_argument("--variants", nargs="+", default=["ours"], choices=list(VARIANTS),
                   help="variants of our pipeline (first one is the reference 'ours')")
    p.add_argument("--seeds-models", nargs="*", default=["resnet"], choices=list(cp.MODELS_REGISTRY),
                   help="our models also measured in the seeds' 224 px pipeline (LeNet-5 always)")
    p.add_argument("--width", type=float, default=BENCH["width"])
    p.add_argument("--batch-size", type=int, default=BENCH["batch_size"])
    p.add_argument("--seconds", type=float, default=BENCH["seconds"], help="timed seconds per measurement")
    p.add_argument("--warmup-steps", type=int, default=BENCH["warmup_steps"])
    p.add_argument("--min-steps", type=int, default=BENCH["min_steps"])
    p.add_argument("--peak-size", type=int, default=BENCH["peak_size"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--data-dir", default=None, help="torchvision root with MNIST (naive/seeds, time to accuracy)")
    p.add_argument("--out", default="results/benchmarks", help="folder for the CSV files and the chart")
    p.add_argument("--tiny", action="store_true",
                   help="CI setting: LeNet-5 and ResNet-18 at width 0.25, one timed step each")
    p.add_argument("--time-to-accuracy", action="store_true", help="only the time-to-accuracy runs")
    p.add_argument("--tta-datasets", nargs="+", default=["mnist", "fashion_mnist"])
    p.add_argument("--tta-model", choices=list(cp.MODELS_REGISTRY))
    p.add_argument("--tta-epochs", type=int)
    p.add_argument("--tta-width", type=float)
    p.add_argument("--tta-batch-size", type=int, help="default: the recipe's")
    p.add_argument("--tta-lr", type=float, help="peak one-cycle lr (default: the recipe's)")
    p.add_argument("--tta-seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (the seed also draws the validation split)")
    p.add_argument("--subset", type=int, help="cap the time-to-accuracy splits (tests)")
    args = p.parse_args(argv)
    if args.tiny:
        args.models = [m for m in args.models if m in ("lenet5", "resnet")] or ["lenet5"]
        args.width, args.seconds, args.warmup_steps, args.min_steps = 0.25, 0.0, 1, 1
        args.batch_size, args.peak_size = 32, 256
    if args.time_to_accuracy and not args.data_dir:
        p.error("--time-to-accuracy needs --data-dir (the real MNIST / Fashion-MNIST)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.time_to_accuracy:
        rows = time_to_accuracy(args)
        if rows:
            cp.save_csv(rows, list(rows[0]), out / "cnn_time_to_accuracy.csv")
            print(f"wrote {out / 'cnn_time_to_accuracy.csv'}")
        return 0
    t0 = time.perf_counter()
    rows = throughput(args)
    cp.save_csv(rows, CSV_COLUMNS, out / "cnn_throughput.csv")
    plot(rows, out / "cnn_throughput.png")
    print(f"wrote {out / 'cnn_throughput.csv'} and {out / 'cnn_throughput.png'} "
          f"({time.perf_counter() - t0:.0f} s; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
