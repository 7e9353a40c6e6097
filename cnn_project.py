"""Seven classic CNNs trained from scratch on MNIST, Fashion-MNIST and CIFAR-10, compared.

    python cnn_project.py                          # every model on every dataset, preset by device
    python cnn_project.py --models resnet senet --datasets mnist --epochs 5
    python cnn_project.py --report                 # rebuild table and plots from results/ alone
    accelerate launch --multi_gpu --num_processes 4 cnn_project.py   # data parallel on 4 GPUs
    torchrun --standalone --nproc_per_node 2 cnn_project.py          # ... or 2 CPU processes

Architectures (our own code, native 28x28 / 32x32 input, no pretrained weights, no upscaling):
LeNet-5, AlexNet, VGG-16-BN, ResNet-18, GoogLeNet, Xception, SE-ResNet-18.

One training recipe for every model (SGD + Nesterov, one-cycle LR, weight decay, label smoothing,
bf16/fp16 autocast, channels_last, batched tensor augmentation, fused SGD on GPUs). Under torchrun
or accelerate launch every process trains on its slice of each global batch (DDP, via accelerate).
5,000 training images are held out as a validation split: it picks each model's checkpoint and the
best model per dataset; the test set is only scored at the end. Every (model, dataset) result is
pickled atomically under results/cnn/<dataset>/<model>.pkl as soon as it finishes, so an interrupted
grid resumes where it stopped. Evidence (accuracies, wall time, hardware, torch version) is in README.md.

Sections: CONFIG, DATA, MODELS, TRAINING, RESULTS, REPORT, CLI.
To add an architecture: write its nn.Module in MODELS and add it to MODELS_REGISTRY (and to the two
presets' per-model budgets). To add a dataset: add a DatasetSpec to DATASETS.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import pickle
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# =============================================================================================
# CONFIG
# =============================================================================================

# The shared recipe: identical for every model and dataset so the comparison is fair.
RECIPE = dict(
    batch_size=256,         # images per optimizer step
    lr=0.1,                 # peak learning rate of the one-cycle schedule (SGD, batch 256)
    momentum=0.9,           # Nesterov momentum (one-cycle lowers it to 0.85 at peak lr)
    weight_decay=5e-4,      # L2 on conv/linear weights only (not on biases or norm parameters)
    label_smoothing=0.1,    # cross-entropy label smoothing
    warmup_fraction=0.2,    # share of steps spent raising the lr to its peak
    val_size=5000,          # training images held out for validation (seeded)
    eval_batch_size=1024,   # images per forward pass at evaluation
)

# Per-architecture budget: {dataset: {model: (epochs, width multiplier)}}. The GPU preset uses the
# canonical widths. The CPU preset (2 cores: the whole 7-model MNIST + Fashion-MNIST grid in under an
# hour) uses quarter-width networks and gives each the epochs its measured seconds per epoch allow
# (bf16, 55k images, 2 AMD EPYC cores: LeNet-5 4 s, AlexNet 18, VGG 22, ResNet 57, SENet 63,
# GoogLeNet 81, Xception 81); MNIST needs fewer passes than Fashion-MNIST.
_GPU = {m: (15, 1.0) for m in ("lenet5", "alexnet", "vgg", "resnet", "googlenet", "xception", "senet")}
PRESETS = {
    "gpu": {"mnist": _GPU, "fashion_mnist": _GPU,
            "cifar10": {m: (30, w) for m, (_, w) in _GPU.items()}},
    "cpu": {
        "mnist": {"lenet5": (10, 1.0), "alexnet": (5, 0.25), "vgg": (5, 0.25), "resnet": (3, 0.25),
                  "googlenet": (3, 0.25), "xception": (3, 0.25), "senet": (3, 0.25)},
        "fashion_mnist": {"lenet5": (15, 1.0), "alexnet": (10, 0.25), "vgg": (10, 0.25),
                          "resnet": (8, 0.25), "googlenet": (4, 0.25), "xception": (4, 0.25),
                          "senet": (5, 0.25)},
        "cifar10": {"lenet5": (15, 1.0), "alexnet": (10, 0.25), "vgg": (10, 0.25),
                    "resnet": (8, 0.25), "googlenet": (4, 0.25), "xception": (4, 0.25),
                    "senet": (5, 0.25)},
    },
}

# Validation accuracy whose first crossing is recorded as "time to target" (seconds of training).
TARGET_VAL_ACCURACY = {"mnist": 0.99, "fashion_mnist": 0.90, "cifar10": 0.80}

# A run whose training loss is still at ln(num_classes) and whose validation accuracy is at chance
# after this many optimizer steps has diverged (or never started learning): it is marked failed.
DIVERGED_MIN_STEPS = 200


# =============================================================================================
# DATA
# =============================================================================================

@dataclass(frozen=True)
class DatasetSpec:
    """How to fetch one dataset with torchvision and how to normalise it."""
    name: str              # CLI name
    torchvision_class: str  # class in torchvision.datasets
    folder: str            # what torchvision creates under --data-dir
    files: tuple           # files torchvision needs there (for the offline error message)
    in_channels: int
    image_size: int        # pixels per side
    mean: tuple
    std: tuple
    pad: int               # random-translation range in pixels (pad then random crop)
    hflip: bool            # random horizontal flip (clothes and objects; never digits)
    classes: tuple


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": DatasetSpec("mnist", "MNIST", "MNIST/raw", MNIST_FILES, 1, 28,
                         (0.1307,), (0.3081,), 2, False, tuple(str(i) for i in range(10))),
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", "FashionMNIST/raw", MNIST_FILES,
                                 1, 28, (0.2860,), (0.3530,), 2, True,
                                 ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                  "Shirt", "Sneaker", "Bag", "Ankle boot")),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", "cifar-10-batches-py",
                           ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                            "data_batch_5", "test_batch", "batches.meta"),
                           3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True,
                           ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck")),
}


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable (offline)."""


def _torchvision_split(spec: DatasetSpec, root: str, train: bool):
    """Return one split as (uint8 images N x C x H x W, int64 labels N), downloading if needed.

    Raises DatasetUnavailable with a one-paragraph explanation if the files are missing and the
    download fails.
    """
    import torchvision
    cls = getattr(torchvision.datasets, spec.torchvision_class)
    try:
        try:
            ds = cls(root, train=train, download=False)
        except RuntimeError:  # not on disk (or corrupt): fetch it, as torchvision does when online
            ds = cls(root, train=train, download=True)
    except Exception as err:  # noqa: BLE001 - any download failure means the same thing to the user
        where = Path(root).resolve() / spec.folder
        raise DatasetUnavailable(
            f"Dataset '{spec.name}' is not in {where} and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). "
            f"torchvision expects the files {', '.join(spec.files)} in that folder. Either connect "
            f"to the internet and run again (torchvision downloads it), copy the files there, or "
            f"point --data-dir at the folder that holds '{spec.folder.split('/')[0]}'.") from None
    images = ds.data
    images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if images.ndim == 3:                      # MNIST-like: N x H x W
        images = images.unsqueeze(1)
    else:                                     # CIFAR: N x H x W x C (numpy)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return images.contiguous(), labels


@dataclass
class Splits:
    """uint8 image tensors (N x C x H x W) and int64 labels for train / val / test, on one device."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_splits(spec: DatasetSpec, root: str, seed: int, val_size: int, subset: int | None,
                device: torch.device) -> Splits:
    """Decode a dataset once into uint8 tensors and hold out a seeded validation split.

    `subset` caps every split at that many images (for quick runs and tests).
    Raises DatasetUnavailable (see _torchvision_split).
    """
    x, y = _torchvision_split(spec, root, train=True)
    test_x, test_y = _torchvision_split(spec, root, train=False)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val_size = min(val_size, len(x) // 10) if subset else val_size
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if subset:
        train_idx, val_idx = train_idx[:subset], val_idx[:subset]
        test_x, test_y = test_x[:subset], test_y[:subset]
    return Splits(*(t.to(device) for t in (x[train_idx], y[train_idx], x[val_idx], y[val_idx],
                                             test_x, test_y)))


def normalize(x_uint8: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 N x C x H x W -> the models' input: float32 standardised with the dataset's channel
    mean/std, in channels_last memory (the layout the models are converted to)."""
    mean = torch.tensor(spec.mean, device=x_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=x_uint8.device).view(1, -1, 1, 1)
    return ((x_uint8.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, spec: DatasetSpec, generator: torch.Generator) -> torch.Tensor:
    """Batched augmentation of raw images N x C x H x W (uint8 or float; same shape and dtype out).

    Random translation by up to `spec.pad` pixels (pad with black, then random crop: torchvision's
    RandomCrop(padding=pad) placed before ToTensor/Normalize, as usual), and a random horizontal
    flip when `spec.hflip`. It runs before `normalize`: padding a normalised batch with zeros would
    frame each digit in grey (0 is the mean, not the black background) that test images never show.
    One gather for the whole batch, no per-image Python.
    """
    n, _, h, w = x.shape
    p = spec.pad
    if p:
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device="cpu").to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device="cpu").to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # n x h
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # n x w
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # n h w c
        x = x.permute(0, 3, 1, 2)
    if spec.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(3), x)
    return x


# =============================================================================================
# MODELS
# =============================================================================================

def ch(channels: int, width: float) -> int:
    """Scale a paper's channel count by the width multiplier (at least 4 channels)."""
    return max(4, int(round(channels * width)))


def conv_bn(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998, "Gradient-based learning applied to
    document recognition").

    C1 conv5x5 (6) -> S2 pool -> C3 conv5x5 (16) -> S4 pool -> C5 (120) -> F6 (84) -> output.
    Modern substitutions: ReLU for the scaled tanh, max pooling for trainable subsampling, full
    C3 connectivity, a linear output for the RBF layer. A 28x28 input is zero-padded by 2 in C1,
    which is exactly the paper's 32x32 field; a 32x32 input is used as is. The activation follows
    the pooling, as the paper's squashing follows its subsampling: ReLU and max commute, so this is
    the same function as ReLU-then-pool, with the ReLU on a quarter of the elements (LeNet-5 is
    bound by such elementwise passes on a CPU; benchmarks/cnn_benchmark.py).
    Input N x in_channels x 28|32 x 28|32 -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 28):
        super().__init__()
        c1, c3, c5, f6 = ch(6, width), ch(16, width), ch(120, width), ch(84, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2 if image_size == 28 else 0),  # C1
            nn.MaxPool2d(2), nn.ReLU(inplace=True),                              # S2
            nn.Conv2d(c1, c3, 5),                                                # C3
            nn.MaxPool2d(2), nn.ReLU(inplace=True))                              # S4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * 5 * 5, c5), nn.ReLU(inplace=True),
            nn.Linear(c5, f6), nn.ReLU(inplace=True), nn.Linear(f6, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky, Sutskever & Hinton, 2012, "ImageNet classification with deep
    convolutional neural networks"), in its usual small-image form.

    Five convolutions (64, 192, 384, 256, 256 channels) with three max-poolings, then two dropout
    fully connected layers (4096) and the output layer. For 28/32 px input the 11x11 stride-4 stem
    becomes a 3x3 stride-1 one and the 3x3 stride-2 pools 2x2 ones; BatchNorm stands where the paper
    had local response normalisation (it lets the shared recipe's learning rate train it).
    Input N x in_channels x H x W (H, W >= 8) -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = [ch(k, width) for k in (64, 192, 384, 256, 256)]
        fc = ch(4096, width)
        self.features = nn.Sequential(
            conv_bn(in_channels, c[0]), nn.MaxPool2d(2),
            conv_bn(c[0], c[1]), nn.MaxPool2d(2),
            conv_bn(c[1], c[2]), conv_bn(c[2], c[3]), conv_bn(c[3], c[4]), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2))  # 28 px ends at 3x3, 32 px at 4x4: pool both to 2x2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(c[4] * 4, fc), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class VGG(nn.Module):
    """VGG-16 with batch normalisation (Simonyan & Zisserman, 2014, "Very deep convolutional
    networks for large-scale image recognition"; BN after Ioffe & Szegedy, 2015).

    Thirteen 3x3 convolutions in five stages (64, 128, 256, 512, 512) as in configuration D. For
    28/32 px input the fifth max-pool is replaced by global average pooling and the three 4096-wide
    fully connected layers by one linear classifier, as the CIFAR versions in the literature do.
    Input N x in_channels x H x W (H, W >= 16) -> logits N x num_classes.
    """

    CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, c_in = [], in_channels
        for v in self.CONFIG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(conv_bn(c_in, ch(v, width)))
                c_in = ch(v, width)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu, Shen & Sun, 2018): global average pool -> FC (C/r) -> ReLU ->
    FC (C) -> sigmoid, which rescales each channel. N x C x H x W -> same shape."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        s = x.mean((2, 3))  # squeeze: N x C (a plain mean is much faster than adaptive pooling on CPU)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))  # excitation: N x C in (0, 1)
        return x * s[:, :, None, None].to(x.dtype)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2015): two 3x3 conv-BN layers plus an identity (or 1x1
    projection) shortcut, ReLU after the sum. With `se=True` a squeeze-and-excitation unit scales
    the residual branch before the sum, as in SE-ResNet (Hu et al., 2018).
    N x c_in x H x W -> N x c_out x H/stride x W/stride."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, se: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.se = SqueezeExcitation(c_out) if se else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """ResNet-18 (He, Zhang, Ren & Sun, 2015, "Deep residual learning for image recognition"),
    CIFAR form: a 3x3 stride-1 stem instead of 7x7/2 + max-pool, then four stages of two basic
    blocks (64, 128, 256, 512 channels; stride 2 at the start of stages 2-4), global average
    pooling and a linear classifier. `se=True` gives SE-ResNet-18 (see SENet).
    Input N x in_channels x H x W -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 blocks: tuple = (2, 2, 2, 2), se: bool = False):
        super().__init__()
        c = [ch(k, width) for k in (64, 128, 256, 512)]
        self.stem = conv_bn(in_channels, c[0])
        stages, c_in = [], c[0]
        for i, (c_out, n) in enumerate(zip(c, blocks)):
            for j in range(n):
                stages.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1, se=se))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class SENet(ResNet):
    """SE-ResNet-18 (Hu, Shen & Sun, 2018, "Squeeze-and-excitation networks"): ResNet-18 whose
    every basic block recalibrates its channels with a squeeze-and-excitation unit (reduction 16).
    Input N x in_channels x H x W -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__(in_channels, num_classes, width, se=True)


class Inception(nn.Module):
    """Inception module (Szegedy et al., 2014): four parallel branches, 1x1 | 1x1->3x3 |
    1x1->5x5 (as two 3x3, the usual factorisation) | 3x3 max-pool->1x1, concatenated on channels.
    N x c_in x H x W -> N x (n1 + n3 + n5 + pool_proj) x H x W."""

    def __init__(self, c_in, n1, n3_reduce, n3, n5_reduce, n5, pool_proj):
        super().__init__()
        self.branch1 = conv_bn(c_in, n1, 1)
        self.branch3 = nn.Sequential(conv_bn(c_in, n3_reduce, 1), conv_bn(n3_reduce, n3))
        self.branch5 = nn.Sequential(conv_bn(c_in, n5_reduce, 1), conv_bn(n5_reduce, n5),
                                     conv_bn(n5, n5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c_in, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 (Szegedy et al., 2014, "Going deeper with convolutions"), with BN.

    The paper's nine Inception modules (3a-3b, 4a-4e, 5a-5b) and their channel table, global average
    pooling, dropout 0.4 and a linear classifier; no auxiliary classifiers (the paper drops them at
    inference and BN makes them unnecessary for training). For 28/32 px input the 7x7/2 stem and its
    max-pools become one 3x3 stride-1 convolution (192 channels) and a 2x2 max-pool, so the modules
    run at 1/2, 1/4 and 1/8 of the input side (16, 8, 4 px for CIFAR).
    Input N x in_channels x H x W -> logits N x num_classes.
    """

    # name: (n1, n3_reduce, n3, n5_reduce, n5, pool_proj), from Table 1 of the paper
    TABLE = {
        "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
        "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
        "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
        "4e": (256, 160, 320, 32, 128, 128),
        "5a": (256, 160, 320, 32, 128, 128), "5b": (384, 192, 384, 48, 128, 128),
    }

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, ch(192, width)), nn.MaxPool2d(2))
        layers, c_in = [], ch(192, width)
        for name, cfg in self.TABLE.items():
            if name in ("4a", "5a"):
                layers.append(nn.MaxPool2d(3, 2, 1))
            n = [ch(k, width) for k in cfg]
            layers.append(Inception(c_in, *n))
            c_in = n[0] + n[2] + n[4] + n[5]
        self.inception = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4),
                                  nn.Linear(c_in, num_classes))

    def forward(self, x):
        return self.head(self.inception(self.stem(x)))


class SeparableConv2d(nn.Module):
    """Depthwise separable convolution (Chollet, 2017): a 3x3 depthwise convolution followed by a
    1x1 pointwise one, then BN. N x c_in x H x W -> N x c_out x H x W."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn(self.pointwise(self.depthwise(x)))


class XceptionBlock(nn.Module):
    """Xception residual block: `reps` x (ReLU -> separable conv) with an identity shortcut, or,
    when the block changes width or resolution, a 3x3/2 max-pool and a 1x1 strided projection
    shortcut. `relu_first=False` drops the first ReLU (the entry flow's first block).
    N x c_in x H x W -> N x c_out x ceil(H/stride) x ceil(W/stride)."""

    def __init__(self, c_in: int, c_out: int, reps: int, stride: int = 1, relu_first: bool = True):
        super().__init__()
        layers = []
        for i in range(reps):
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))
            layers.append(SeparableConv2d(c_in if i == 0 else c_out, c_out))
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.residual = nn.Sequential(*layers)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class Xception(nn.Module):
    """Xception (Chollet, 2017, "Xception: Deep learning with depthwise separable convolutions").

    Entry flow: two 3x3 convolutions (32, 64) and three strided blocks (128, 256, 728); middle flow:
    `middle_blocks` (8 in the paper) residual blocks of three 728-wide separable convolutions; exit
    flow: a strided block (728 -> 1024), separable convolutions 1536 and 2048, global average
    pooling and a linear classifier. For 28/32 px input the stem convolutions have stride 1 (the
    paper's first one has stride 2 on 299 px), so the middle flow runs at 1/8 of the input side.
    Input N x in_channels x H x W -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 middle_blocks: int = 8):
        super().__init__()
        c32, c64, c128, c256, c728, c1024, c1536, c2048 = (
            ch(k, width) for k in (32, 64, 128, 256, 728, 1024, 1536, 2048))
        self.entry_flow = nn.Sequential(
            conv_bn(in_channels, c32), conv_bn(c32, c64),
            XceptionBlock(c64, c128, 2, stride=2, relu_first=False),
            XceptionBlock(c128, c256, 2, stride=2),
            XceptionBlock(c256, c728, 2, stride=2))
        self.middle_flow = nn.Sequential(*[XceptionBlock(c728, c728, 3) for _ in range(middle_blocks)])
        self.exit_flow = nn.Sequential(
            XceptionBlock(c728, c1024, 2, stride=2),
            SeparableConv2d(c1024, c1536), nn.ReLU(inplace=True),
            SeparableConv2d(c1536, c2048), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2048, num_classes))

    def forward(self, x):
        return self.exit_flow(self.middle_flow(self.entry_flow(x)))


# CLI name -> (display name, constructor(in_channels, num_classes, width, image_size) -> nn.Module)
MODELS_REGISTRY = {
    "lenet5": ("LeNet-5", lambda c, k, w, s: LeNet5(c, k, w, image_size=s)),
    "alexnet": ("AlexNet", lambda c, k, w, s: AlexNet(c, k, w)),
    "vgg": ("VGG-16-BN", lambda c, k, w, s: VGG(c, k, w)),
    "resnet": ("ResNet-18", lambda c, k, w, s: ResNet(c, k, w)),
    "googlenet": ("GoogLeNet", lambda c, k, w, s: GoogLeNet(c, k, w)),
    "xception": ("Xception", lambda c, k, w, s: Xception(c, k, w)),
    "senet": ("SE-ResNet-18", lambda c, k, w, s: SENet(c, k, w)),
}


def build_model(name: str, in_channels: int, num_classes: int, width: float,
                image_size: int) -> nn.Module:
    """Instantiate a registered architecture. Raises KeyError naming the known models."""
    if name not in MODELS_REGISTRY:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(MODELS_REGISTRY)}")
    return MODELS_REGISTRY[name][1](in_channels, num_classes, width, image_size)


# =============================================================================================
# TRAINING
# =============================================================================================

class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf, or stayed at chance level (ln num_classes) after an epoch."""


def make_accelerator(device: str, precision: str):
    """One accelerate.Accelerator for this process: device placement and autocast.

    device: 'auto' | 'cpu' | 'cuda'; precision: 'auto' (bf16 on CPU and on GPUs that support it,
    else fp16 with loss scaling) | 'bf16' | 'fp16' | 'no'. Raises ValueError for CUDA without a GPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if on_cpu or torch.cuda.is_bf16_supported() else "fp16"
    AcceleratorState._reset_state(True)  # a fresh state: tests and notebooks may call main() twice
    return Accelerator(cpu=on_cpu, mixed_precision=precision)


def parameter_groups(model: nn.Module, weight_decay: float):
    """Weight decay on conv/linear weights only; biases and norm scales/shifts are not decayed."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, spec: DatasetSpec,
             accelerator, batch_size: int):
    """Score a model on uint8 images N x C x H x W with labels N.

    With several processes each scores every num_processes-th image, after taking process 0's
    BatchNorm running statistics, and the results are gathered, so every process returns the same.
    Returns (mean cross-entropy in nats without label smoothing, accuracy in [0, 1],
    predicted labels as an int64 CPU tensor of length N).
    """
    module = accelerator.unwrap_model(model)  # no DDP hooks: the shards may differ by one batch
    module.eval()
    world = accelerator.num_processes
    if world > 1:  # DDP keeps parameters equal, not the running statistics of each process
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
    idx = torch.arange(accelerator.process_index, len(y), world, device=y.device)
    loss_sum = torch.zeros((), device=y.device)
    preds = []
    for i in range(0, len(idx), batch_size):
        x = normalize(x_uint8[idx[i:i + batch_size]], spec)
        with accelerator.autocast():
            logits = module(x).float()
        loss_sum += F.cross_entropy(logits, y[idx[i:i + batch_size]], reduction="sum")
        preds.append(logits.argmax(1))
    preds = torch.cat(preds) if preds else y[:0]
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
        gathered_idx = accelerator.gather(accelerator.pad_across_processes(idx, pad_index=-1))
        gathered = accelerator.gather(accelerator.pad_across_processes(preds, pad_index=-1))
        keep = gathered_idx >= 0
        preds = torch.empty_like(y)
        preds[gathered_idx[keep]] = gathered[keep]
    return (loss_sum / len(y)).item(), (preds == y).float().mean().item(), preds.cpu()


def train_batch(model: nn.Module, optimizer, scheduler, criterion, x_uint8: torch.Tensor,
                y: torch.Tensor, spec: DatasetSpec, generator: torch.Generator, accelerator):
    """One optimizer step on a batch of uint8 images N x C x H x W (labels N): augment,
    normalise, forward under autocast, backward, step. The benchmark times exactly this.

    Returns (mean training loss of the batch, logits N x num_classes), both detached.
    """
    x = normalize(augment(x_uint8, spec, generator), spec)
    with accelerator.autocast():
        logits = model(x)
        loss = criterion(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    return loss.detach(), logits.detach()


def make_optimizer(model: nn.Module, cfg: dict, total_steps: int, fused: bool | None = None):
    """The shared recipe's SGD (Nesterov) and one-cycle schedule for `total_steps` steps.

    fused: torch's fused SGD kernel (one kernel for all parameters); None = only for parameters on
    a GPU, where it saves a launch per parameter. On the CPU it was no faster than the default SGD
    in benchmarks/cnn_benchmark.py (README), so the default is kept there.
    """
    if fused is None:
        fused = next(model.parameters()).is_cuda
    kwargs = dict(lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    try:
        optimizer = torch.optim.SGD(parameter_groups(model, cfg["weight_decay"]), fused=fused, **kwargs)
    except (RuntimeError, TypeError):  # an older torch or a device without the fused kernel
        optimizer = torch.optim.SGD(parameter_groups(model, cfg["weight_decay"]), **kwargs)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg["lr"], total_steps=total_steps,
        pct_start=cfg["warmup_fraction"], anneal_strategy="linear",
        base_momentum=0.85, max_momentum=cfg["momentum"])
    return optimizer, scheduler


def train_one(model_name: str, spec: DatasetSpec, data: Splits, epochs: int, width: float,
              cfg: dict, accelerator, seed: int, show_progress: bool = True,
              stop_at_val_accuracy: float | None = None) -> dict:
    """Train one architecture on one dataset with the shared recipe; return its result record.

    The checkpoint with the best validation accuracy is restored before the test set is scored.
    `stop_at_val_accuracy` (in [0, 1]) ends training after the first epoch whose validation
    accuracy reaches it (time-to-accuracy runs); the test set never decides anything.
    A diverged run returns a record with status 'failed' and the reason instead of raising.
    """
    from accelerate.utils import set_seed
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    from tqdm.auto import tqdm

    set_seed(seed)
    num_classes = len(spec.classes)
    model = build_model(model_name, spec.in_channels, num_classes, width, spec.image_size)
    model = model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg["batch_size"] % world:
        raise ValueError(f"--batch-size {cfg['batch_size']} must be a multiple of the number of "
                         f"processes ({world})")
    steps_per_epoch = max(1, len(data.train_y) // cfg["batch_size"])  # drop the ragged last batch
    images_per_epoch = min(steps_per_epoch * cfg["batch_size"], len(data.train_y))
    model = model.to(accelerator.device)  # before the optimizer, which picks its kernel by device
    optimizer, scheduler = make_optimizer(model, cfg, epochs * steps_per_epoch)
    # The scheduler is not handed to accelerate: it would step it once per process, for a batch
    # that grows with the processes; here the global batch is split, so one step is one step.
    model, optimizer = accelerator.prepare(model, optimizer)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"])
    # Shuffling: one generator seeded alike on every process, so all agree on each global batch and
    # each takes its own slice of it (DDP averages the gradients: the step is that of the whole
    # batch). Augmentation: a generator of each process's own. Both on the CPU, for reproducibility.
    shuffle_generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator().manual_seed(seed + 1 + rank)

    history = {k: [] for k in ("epoch", "train_loss", "train_accuracy", "val_loss",
                               "val_accuracy", "lr", "epoch_time_s")}
    best = {"val_accuracy": -1.0, "epoch": 0, "state": None}
    status, failure, train_time, time_to_target = "ok", None, 0.0, None
    target = TARGET_VAL_ACCURACY.get(spec.name)
    label = f"{MODELS_REGISTRY[model_name][0]} / {spec.name}"
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(len(data.train_y), generator=shuffle_generator).to(data.train_y.device)
            loss_sum = torch.zeros((), device=data.train_y.device)
            correct = torch.zeros((), device=data.train_y.device, dtype=torch.int64)
            bar = tqdm(range(steps_per_epoch), desc=f"{label} epoch {epoch}/{epochs}", leave=False,
                       disable=not (show_progress and accelerator.is_local_main_process),
                       dynamic_ncols=True)
            for step in bar:
                idx = perm[step * cfg["batch_size"]:(step + 1) * cfg["batch_size"]][rank::world]
                y = data.train_y[idx]
                loss, logits = train_batch(model, optimizer, scheduler, criterion, data.train_x[idx],
                                           y, spec, augment_generator, accelerator)
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                # One sync per 50 steps; summed over processes so that all stop together.
                if step % 50 == 49 and not torch.isfinite(accelerator.reduce(loss_sum, "sum")):
                    raise TrainingDiverged(f"training loss became non-finite in epoch {epoch}")
            loss_sum, correct = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(correct, "sum")
            train_loss = (loss_sum / images_per_epoch).item()
            train_acc = (correct.float() / images_per_epoch).item()
            epoch_time = time.perf_counter() - t0
            train_time += epoch_time
            val_loss, val_acc, _ = evaluate(model, data.val_x, data.val_y, spec, accelerator,
                                            cfg["eval_batch_size"])
            for k, v in zip(history, (epoch, train_loss, train_acc, val_loss, val_acc,
                                      scheduler.get_last_lr()[0], epoch_time)):
                history[k].append(v)
            accelerator.print(f"  {label} epoch {epoch:>2}/{epochs}: train loss {train_loss:.4f} acc "
                  f"{train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | {epoch_time:.1f}s",
                  flush=True)
            if not math.isfinite(train_loss):
                raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}")
            if (epoch * steps_per_epoch >= DIVERGED_MIN_STEPS and val_acc <= 1.5 / num_classes
                    and train_loss > 0.95 * math.log(num_classes)):
                raise TrainingDiverged(f"loss stuck at chance level (ln {num_classes} = "
                                       f"{math.log(num_classes):.3f}) after epoch {epoch}")
            if val_acc > best["val_accuracy"]:
                best = {"val_accuracy": val_acc, "epoch": epoch,
                        "state": copy.deepcopy(accelerator.unwrap_model(model).state_dict())}
            if time_to_target is None and target is not None and val_acc >= target:
                time_to_target = train_time
            if stop_at_val_accuracy is not None and val_acc >= stop_at_val_accuracy:
                break
    except TrainingDiverged as err:
        status, failure = "failed", str(err)
        accelerator.print(f"  {label}: FAILED, {failure}", flush=True)

    record = {
        "format": RESULTS_FORMAT, "model": model_name, "model_display_name": MODELS_REGISTRY[model_name][0],
        "dataset": spec.name, "status": status, "failure_reason": failure,
        "history": history, "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"] if best["state"] is not None else None,
        "params": n_params, "train_time_s": train_time,
        "throughput_img_s": (len(history["epoch"]) * images_per_epoch / train_time
                             if history["epoch"] else None),
        "target_val_accuracy": target, "time_to_target_s": time_to_target,
        "test": None, "classes": list(spec.classes),
    }
    if status == "ok":
        accelerator.unwrap_model(model).load_state_dict(best["state"])
        test_loss, test_acc, preds = evaluate(model, data.test_x, data.test_y, spec, accelerator,
                                              cfg["eval_batch_size"])
        y_true = data.test_y.cpu().numpy()
        y_pred = preds.numpy()
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(num_classes)), average="macro", zero_division=0)
        record["test"] = {
            "loss": test_loss, "accuracy": test_acc, "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "n_images": int(len(y_true)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(num_classes))),
        }
    return record


# =============================================================================================
# RESULTS (plain Python types and NumPy arrays only: pickle.load opens them without this file)
# =============================================================================================

RESULTS_FORMAT = "cnn_project/1"
SUMMARY_COLUMNS = ("dataset", "model", "status", "params", "epochs", "width", "best_epoch",
                   "best_val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1",
                   "test_loss", "train_time_s", "throughput_img_s", "time_to_target_s",
                   "failure_reason")


class ResultsFileError(RuntimeError):
    """A results pickle is corrupt or was not written by this program."""


def result_path(results_dir: Path, dataset: str, model: str) -> Path:
    """Where one (dataset, model) record lives: <results_dir>/cnn/<dataset>/<model>.pkl."""
    return Path(results_dir) / "cnn" / dataset / f"{model}.pkl"


def _write_atomically(path: Path, write, binary: bool = True) -> None:
    """Call write(file) on a temp file beside `path`, then rename it over `path`: a kill leaves the
    old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pickle(obj, path: Path) -> None:
    """Write a pickle atomically (plain types and NumPy arrays, protocol 4)."""
    _write_atomically(path, lambda f: pickle.dump(obj, f, protocol=4))


def save_csv(rows: list, columns: list, path: Path) -> None:
    """Write dict rows as a CSV table atomically; floats with 6 significant digits."""
    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    _write_atomically(path, write, binary=False)


def load_result(path: Path) -> dict:
    """Load one (model, dataset) record. Raises ResultsFileError naming the file if it is corrupt
    or not a record of this program."""
    try:
        with open(path, "rb") as f:
            record = pickle.load(f)
    except Exception as err:  # noqa: BLE001 - truncated, garbage, or needs a missing class
        raise ResultsFileError(f"{path} is not a readable results pickle ({type(err).__name__}: "
                               f"{err}). Delete it, or rerun that pair with --force.") from None
    if not isinstance(record, dict) or record.get("format") != RESULTS_FORMAT:
        raise ResultsFileError(f"{path} is not a {RESULTS_FORMAT} results record. Move it out of "
                               f"the results folder, or rerun that pair with --force.")
    return record


def collect_results(results_dir: Path) -> dict:
    """All records under results_dir/cnn as {dataset: {model: record}}, in registry order."""
    found = {}
    for dataset in DATASETS:
        for model in MODELS_REGISTRY:
            path = result_path(results_dir, dataset, model)
            if path.exists():
                found.setdefault(dataset, {})[model] = load_result(path)
    return found


def summary_rows(results: dict) -> list:
    """One flat dict per (dataset, model) with the SUMMARY_COLUMNS."""
    rows = []
    for dataset, by_model in results.items():
        for model, r in by_model.items():
            test = r["test"] or {}
            rows.append({
                "dataset": dataset, "model": r["model_display_name"], "status": r["status"],
                "params": r["params"], "epochs": len(r["history"]["epoch"]),
                "width": r["config"]["width"], "best_epoch": r["best_epoch"],
                "best_val_accuracy": r["best_val_accuracy"], "test_accuracy": test.get("accuracy"),
                "test_precision": test.get("precision"), "test_recall": test.get("recall"),
                "test_f1": test.get("f1"), "test_loss": test.get("loss"),
                "train_time_s": r["train_time_s"], "throughput_img_s": r["throughput_img_s"],
                "time_to_target_s": r["time_to_target_s"], "failure_reason": r["failure_reason"]})
    return rows


def best_models(results: dict) -> dict:
    """{dataset: model} with the highest validation accuracy among finished runs (test not used)."""
    best = {}
    for dataset, by_model in results.items():
        ok = {m: r for m, r in by_model.items() if r["status"] == "ok"}
        if ok:
            best[dataset] = max(ok, key=lambda m: ok[m]["best_val_accuracy"])
    return best


def write_summaries(results: dict, results_dir: Path) -> None:
    """Combined pickle (results/cnn_results.pkl) and a CSV table (results/cnn_summary.csv)."""
    results_dir = Path(results_dir)
    save_pickle({"format": RESULTS_FORMAT, "results": results, "best_by_validation": best_models(results)},
                results_dir / "cnn_results.pkl")
    save_csv(summary_rows(results), SUMMARY_COLUMNS, results_dir / "cnn_summary.csv")


# =============================================================================================
# REPORT (table and plots, from the pickles alone)
# =============================================================================================

def _fmt(v, pattern="{:.2%}"):
    """Format a number for the table; None (not measured / not reached) prints as '-'."""
    return "-" if v is None else pattern.format(v)


def print_table(results: dict) -> None:
    """Print the comparison table and the best model per dataset (chosen on validation)."""
    best = best_models(results)
    header = (f"{'dataset':<14}{'model':<14}{'params':>9}{'ep':>4}{'val acc':>9}{'test acc':>10}"
              f"{'prec':>8}{'recall':>8}{'F1':>8}{'train s':>9}{'img/s':>8}{'to target':>10}")
    print("\n" + header + "\n" + "-" * len(header))
    for row in summary_rows(results):
        mark = " *" if best.get(row["dataset"]) == next(
            k for k, (name, _) in MODELS_REGISTRY.items() if name == row["model"]) else ""
        if row["status"] != "ok":
            print(f"{row['dataset']:<14}{row['model']:<14}{row['params']:>9,}{row['epochs']:>4}  "
                  f"FAILED: {row['failure_reason']}")
            continue
        print(f"{row['dataset']:<14}{row['model']:<14}{row['params']:>9,}{row['epochs']:>4}"
              f"{_fmt(row['best_val_accuracy']):>9}{_fmt(row['test_accuracy']):>10}"
              f"{_fmt(row['test_precision']):>8}{_fmt(row['test_recall']):>8}{_fmt(row['test_f1']):>8}"
              f"{row['train_time_s']:>9.0f}{_fmt(row['throughput_img_s'], '{:.0f}'):>8}"
              f"{_fmt(row['time_to_target_s'], '{:.0f} s'):>10}{mark}")
    print("\n* best model per dataset, chosen by validation accuracy; its test figures are reported")
    for dataset, model in best.items():
        r = results[dataset][model]
        print(f"  {dataset}: {r['model_display_name']} (val {r['best_val_accuracy']:.2%}, "
              f"test accuracy {r['test']['accuracy']:.2%}, macro F1 {r['test']['f1']:.4f})")


def make_plots(results: dict, results_dir: Path) -> list:
    """Save PNGs under results_dir/cnn/plots and return their paths: per-dataset loss/accuracy
    curves, a bar chart of test metrics, and the confusion matrix of each dataset's best model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    out = Path(results_dir) / "cnn" / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, by_model in results.items():
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
        for r in by_model.values():
            h = r["history"]
            style = "-" if r["status"] == "ok" else ":"
            for ax, key in zip(axes.flat, ("train_loss", "val_loss", "train_accuracy", "val_accuracy")):
                ax.plot(h["epoch"], h[key], style, marker="o", ms=3, label=r["model_display_name"])
        for ax, title in zip(axes.flat, ("train loss (label-smoothed CE)", "validation loss (CE)",
                                         "train accuracy (augmented)", "validation accuracy")):
            ax.set_title(title)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("epoch")
        axes[0, 0].legend(fontsize=8)
        fig.suptitle(f"{dataset}: training curves")
        fig.tight_layout()
        paths.append(out / f"curves_{dataset}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    rows = [r for r in summary_rows(results) if r["status"] == "ok"]
    if rows:
        metrics = ("test_accuracy", "test_precision", "test_recall", "test_f1")
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.5), squeeze=False)
        for ax, dataset in zip(axes[0], datasets):
            sub = [r for r in rows if r["dataset"] == dataset]
            xs = np.arange(len(sub))
            for i, m in enumerate(metrics):
                ax.bar(xs + (i - 1.5) * 0.2, [r[m] for r in sub], 0.2, label=m.replace("test_", ""))
            ax.set_xticks(xs, [r["model"] for r in sub], rotation=30, ha="right")
            low = min(r[m] for r in sub for m in metrics)
            high = max(r[m] for r in sub for m in metrics)
            ax.set_ylim(max(0.0, low - 0.02), min(1.0, high + 0.01))
            ax.set_title(f"{dataset}: test metrics (macro)")
            ax.grid(axis="y", alpha=0.3)
        axes[0, 0].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        paths.append(out / "test_metrics.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    for dataset, model in best_models(results).items():
        r = results[dataset][model]
        fig, ax = plt.subplots(figsize=(7, 6))
        ConfusionMatrixDisplay(r["test"]["confusion_matrix"], display_labels=r["classes"]).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
        ax.set_title(f"{dataset}: {r['model_display_name']} (best on validation), "
                     f"test accuracy {r['test']['accuracy']:.2%}")
        fig.tight_layout()
        paths.append(out / f"confusion_{dataset}_{model}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def report(results_dir: Path, results: dict | None = None) -> dict:
    """Rebuild combined pickle, CSV, table and plots from results_dir/cnn/*/*.pkl (or from
    `results`, already collected from there). Raises ResultsFileError if there are none."""
    results = collect_results(results_dir) if results is None else results
    if not results:
        raise ResultsFileError(f"no results under {Path(results_dir) / 'cnn'}: train first "
                               f"(python cnn_project.py)")
    write_summaries(results, results_dir)
    print_table(results)
    for p in make_plots(results, results_dir):
        print(f"plot: {p}")
    return results


# =============================================================================================
# CLI
# =============================================================================================

def versions() -> dict:
    """Library versions and hardware, stored with every result."""
    import accelerate
    import sklearn
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; unknown model/dataset names exit with status 2."""
    p = argparse.ArgumentParser(
        description="Train LeNet-5, AlexNet, VGG, ResNet, GoogLeNet, Xception and SENet from scratch "
                    "on MNIST, Fashion-MNIST and CIFAR-10, and compare them.")
    p.add_argument("--models", nargs="+", default=list(MODELS_REGISTRY), metavar="NAME",
                   help=f"architectures to train (default all): {' '.join(MODELS_REGISTRY)}")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="NAME",
                   help=f"datasets (default all): {' '.join(DATASETS)}")
    p.add_argument("--epochs", type=int, help="epochs for every model (default: the preset's per model)")
    p.add_argument("--width", type=float, help="width multiplier for every model (default: preset's)")
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["lr"], help="peak one-cycle learning rate")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                   help="per-model epochs and widths; auto picks gpu when CUDA is used, else cpu")
    p.add_argument("--data-dir", default="./data", help="torchvision dataset root (downloads there)")
    p.add_argument("--results-dir", default="./results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                   help="autocast precision (auto: bf16 on CPU and recent GPUs, fp16 on older GPUs)")
    p.add_argument("--subset", type=int, help="cap every split at this many images (quick runs)")
    p.add_argument("--force", action="store_true", help="retrain pairs that already have results")
    p.add_argument("--report", action="store_true", help="only rebuild table and plots from results")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    args = p.parse_args(argv)
    for kind, names, known in (("model", args.models, MODELS_REGISTRY), ("dataset", args.datasets, DATASETS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"unknown {kind} name(s): {', '.join(unknown)}; choose from {', '.join(known)}")
    for flag in ("epochs", "batch_size", "subset"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.width is not None and args.width <= 0:
        p.error("--width must be positive")
    return args


def run_grid(args: argparse.Namespace) -> dict:
    """Train every requested (dataset, model) pair not yet finished, writing each record as soon as
    it is done; then rebuild the summaries and plots. Returns {dataset: {model: record}}."""
    accelerator = make_accelerator(args.device, args.precision)
    preset_name = args.preset if args.preset != "auto" else (
        "gpu" if accelerator.device.type == "cuda" else "cpu")
    preset = PRESETS[preset_name]
    cfg = dict(RECIPE, batch_size=args.batch_size, lr=args.lr)
    log = accelerator.print  # only the main process prints and writes; all of them train
    log(f"device {accelerator.device}, precision {accelerator.mixed_precision}, preset {preset_name}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads x {accelerator.num_processes} "
        f"process(es)", flush=True)
    unavailable = []
    for dataset in args.datasets:
        spec = DATASETS[dataset]
        todo = []
        for model in args.models:
            path = result_path(args.results_dir, dataset, model)
            if path.exists() and not args.force:
                load_result(path)  # a corrupt file stops the run here, naming it, and is kept
                log(f"{dataset}/{model}: finished earlier ({path}), skipped (--force retrains)")
            else:
                todo.append(model)
        if not todo:
            continue
        try:
            data = load_splits(spec, args.data_dir, args.seed, cfg["val_size"], args.subset,
                               accelerator.device)
        except DatasetUnavailable as err:  # go on with the other datasets, fail at the end
            if accelerator.is_main_process:
                print(f"error: {err}", file=sys.stderr, flush=True)
            unavailable.append(dataset)
            continue
        log(f"{dataset}: {len(data.train_y)} train / {len(data.val_y)} validation / "
              f"{len(data.test_y)} test images", flush=True)
        for model in todo:
            epochs, width = preset[dataset][model]
            epochs = args.epochs or epochs
            width = args.width or width
            t0 = time.perf_counter()
            record = train_one(model, spec, data, epochs, width, cfg, accelerator, args.seed,
                               show_progress=not args.no_progress)
            record["wall_time_s"] = time.perf_counter() - t0
            record["config"] = dict(cfg, model=model, dataset=dataset, epochs=epochs, width=width,
                                    seed=args.seed, preset=preset_name, subset=args.subset,
                                    device=str(accelerator.device),
                                    precision=str(accelerator.mixed_precision),
                                    channels_last=True, optimizer="SGD(nesterov)",
                                    schedule="one-cycle, linear",
                                    num_processes=accelerator.num_processes)
            record["versions"] = versions()
            if accelerator.is_main_process:
                save_pickle(record, result_path(args.results_dir, dataset, model))
            accelerator.wait_for_everyone()  # the next pair's skip check sees this file on all
            test = record["test"]
            log(f"{dataset}/{model}: {record['status']}"
                  + (f", test accuracy {test['accuracy']:.2%}" if test else "")
                  + f", {record['wall_time_s']:.0f} s -> {result_path(args.results_dir, dataset, model)}",
                  flush=True)
    results = collect_results(args.results_dir)
    if results and accelerator.is_main_process:
        report(args.results_dir, results)
    if unavailable:
        raise DatasetUnavailable(f"not trained, dataset unavailable: {', '.join(unavailable)} "
                                 f"(see the message above)")
    return results


def main(argv=None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 data/results problem, 130 interrupted)."""
    args = parse_args(argv)
    try:
        if args.report:
            report(args.results_dir)
        else:
            run_grid(args)
    except (DatasetUnavailable, ResultsFileError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished pairs are saved; run the same command again to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
