"""Seven classic CNNs trained from scratch on MNIST, Fashion-MNIST and CIFAR-10, compared.

The file reads as a lesson, then its machinery: stop at THE MACHINERY's banner and you have seen
the recipe, the data, the seven networks and the training loop.
  THE LESSON
    CONFIG     the shared recipe (RECIPE) and the presets' epochs and widths (PRESETS, budget)
    DATA       the built-in datasets (DATASETS), the validation split (load_splits), normalize, augment
    MODELS     the seven architectures and their blocks, with their papers and tensor shapes;
               MODELS_REGISTRY
    TRAINING   optimizer and schedule (make_optimizer), setup (setup_training), the training loop
               (fit), evaluate, and train_one: set up, fit, score one run
  THE MACHINERY (everything below supports the lesson)
    IMAGE FOLDERS, TRAINING HELPERS, PRECISION, COST AND SCORES, CHECKPOINTS, RESULTS, COMPARISON,
    REPORT, PREDICT, INSPECTION (--inspect: Grad-CAM, filters, feature maps, calibration,
    robustness to corruptions, per-class accuracy), CLI

    python cnn_project.py                          # every model on every dataset, preset by device
    python cnn_project.py --models resnet senet --datasets mnist --epochs 5
    python cnn_project.py --datasets cifar10 --seeds 3   # three seeds: the spread and paired tests
    python cnn_project.py --report                 # rebuild table and plots from results/ alone
    python cnn_project.py --report --full-table    # ... with every statistic (p-values, F1, ...)
    python cnn_project.py --predict digit.png --dataset mnist --model vgg   # your own image
    python cnn_project.py --predict digit.png --dataset mnist --explain   # ... and where it looked
    python cnn_project.py --inspect --results-dir results/reference_cpu  # see inside the networks
    accelerate launch --multi_gpu --num_processes 4 cnn_project.py   # data parallel on 4 GPUs
    torchrun --standalone --nproc_per_node 2 cnn_project.py          # ... or 2 CPU processes

Architectures (our own code, native 28x28 / 32x32 input, no pretrained weights, no upscaling):
LeNet-5, AlexNet, VGG-16-BN, ResNet-18, GoogLeNet, Xception, SE-ResNet-18.

One training recipe and one budget rule (equal epochs on a dataset) for every model (SGD +
Nesterov, one-cycle LR, weight decay, label smoothing, autocast by device: bf16 on CPUs with native
bf16 and GPUs of compute capability >= 8.0, fp32 on other CPUs, fp16 with loss scaling on 7.x such
as Colab's T4; channels_last, batched tensor augmentation, fused SGD on GPUs). CIFAR-10 is read from
torchvision's files or an image-folder copy; any folder of class sub-folders trains the same way. Under torchrun
or accelerate launch every process trains on its slice of each global batch (DDP, via accelerate).
5,000 training images are held out as a validation split (an image folder's own val/ folder when
it has one): it picks each model's checkpoint and the best model per dataset; the test set is only
scored at the end. Every (model, dataset, seed) result
is pickled atomically under results/cnn/<dataset>/<model>.pkl (<model>.seed<k>.pkl for seed k),
keyed by its settings, with the chosen weights beside it (.safetensors); during training a checkpoint
after every epoch lets a rerun resume an interrupted run from its last epoch. The report gives each
pair's mean and spread over seeds and compares every model with the best on validation on the same
test images (exact McNemar test per seed, paired bootstrap interval): a verdict per model, "tied with
the best within noise" unless the test set can tell them apart. A record holds accuracy beside cost (parameters, forward
MACs per image and training FLOPs counted with torch.utils.flop_counter, seconds, images/s) and what
the network gets wrong (per-class accuracy, every test prediction, its most confident mistakes).
The committed reference run (CPU preset, 3 seeds of all 21 pairs) is in results/reference_cpu, the
GPU preset's CIFAR-10 run in results/reference_gpu.
Evidence (accuracies, wall time, hardware, torch version) is in docs/cnn_project.md.

To add an architecture: write its nn.Module in MODELS and add it to MODELS_REGISTRY (it trains each
dataset's preset epochs, like every model). To add a dataset: add a DatasetSpec to DATASETS and its
epochs to PRESETS, or pass an image folder's path to --datasets.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import csv
import dataclasses
import errno
import functools
import hashlib
import io
import math
import os
import pickle
import platform
import shlex
import sys
import tempfile
import textwrap
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# #############################################################################################
# ===== THE LESSON: the recipe, the data, the seven networks and the training loop =====
# #############################################################################################

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

# One budget rule for every model: on a dataset, every architecture trains the same number of
# epochs (the literature's way of comparing them), with the recipe above; no model's budget is set
# from its own accuracy. A preset says how many epochs per dataset, and each model's width: the GPU
# preset trains the canonical widths; the CPU preset quarter-width networks, LeNet-5 at its own
# full width (62k parameters already): on 2 AMD EPYC cores (2026-12-02) CIFAR-10's 7 pairs took
# 68 min and MNIST's and Fashion-MNIST's 14 took 55 min, the whole 21-pair grid 2 h 03 min.
# A learner's own image folder ("image_folder") trains the preset's folder epochs.
BUDGET_RULE = "equal epochs for every model on a dataset"
PRESETS = {
    "gpu": {"epochs": {"mnist": 15, "fashion_mnist": 15, "cifar10": 30, "image_folder": 30},
            "width": {}},                          # every model at width 1.0
    "cpu": {"epochs": {"mnist": 4, "fashion_mnist": 6, "cifar10": 10, "image_folder": 10},
            "width": {"lenet5": 1.0}},             # every other model at width 0.25
}
DEFAULT_WIDTH = {"gpu": 1.0, "cpu": 0.25}


def budget(preset: str, dataset: str, model: str) -> tuple:
    """(epochs, width) of one pair under BUDGET_RULE: the preset's epochs for the dataset (a
    learner's folder: its 'image_folder' epochs), the preset's width for the model."""
    epochs = PRESETS[preset]["epochs"]
    return (epochs.get(dataset, epochs["image_folder"]),
            PRESETS[preset]["width"].get(model, DEFAULT_WIDTH[preset]))


# Validation accuracy whose first crossing is recorded as "time to target" (seconds of training).
TARGET_VAL_ACCURACY = {"mnist": 0.99, "fashion_mnist": 0.90, "cifar10": 0.80}


# =============================================================================================
# DATA
# =============================================================================================

@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset (torchvision's files, or an image folder) and how to normalise it."""
    name: str              # CLI name (and the results folder's)
    torchvision_class: str | None  # class in torchvision.datasets; None: an image folder only
    folder: str            # torchvision: what it creates under --data-dir; image folder: its path
    files: tuple           # files torchvision needs there (for the offline error message)
    in_channels: int       # 1 (grey) or 3 (RGB); an image folder's: inferred from its images
    image_size: int        # pixels per side (square); an image folder's: inferred or --image-size
    mean: tuple            # per-channel mean and std on the 0-1 scale (an image folder's: computed
    std: tuple             # on its training split)
    pad: int               # random-translation range in pixels (pad then random crop)
    hflip: bool            # random horizontal flip (clothes and objects; never digits)
    classes: tuple
    object_size: int | None = None  # --predict: the object's longer side in the frame, in pixels
                                    # (None: a whole photo, resized to image_size)
    title: str = ""        # how tables and plots name it ("CIFAR-10")
    image_folders: tuple = ()  # folders under --data-dir holding an image-folder copy
                               # (train/<class>/*, test/<class>/*), read when torchvision's are not


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DATASETS = {
    "mnist": DatasetSpec("mnist", "MNIST", "MNIST/raw", MNIST_FILES, 1, 28,
                         (0.1307,), (0.3081,), 2, False, tuple(str(i) for i in range(10)),
                         object_size=20,  # LeCun et al.: digits fit a 20x20 box, centred by mass
                         title="MNIST"),
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", "FashionMNIST/raw", MNIST_FILES,
                                 1, 28, (0.2860,), (0.3530,), 2, True,
                                 ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                  "Shirt", "Sneaker", "Bag", "Ankle boot"),
                                 object_size=28,  # Xiao et al. 2017: longest edge scaled to 28
                                 title="Fashion-MNIST"),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", "cifar-10-batches-py",
                           ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                            "data_batch_5", "test_batch", "batches.meta"),
                           3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 4, True,
                           ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"), title="CIFAR-10",
                           image_folders=("CIFAR10-JPEG", "cifar10", "CIFAR-10")),
}


@dataclass
class Splits:
    """uint8 image tensors (N x C x H x W) and int64 labels for train / val / test, on one device."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    spec: DatasetSpec | None = None   # the dataset's spec (an image folder's, as read from it)
    source: dict | None = None        # where the images came from (read_dataset)


def load_splits(spec: DatasetSpec, root: str, seed: int, val_size: int, subset: int | None,
                device: torch.device, image_size: int | None = None, cache_dir: str | None = None,
                show_progress: bool = False, listing: tuple | None = None) -> Splits:
    """Decode a dataset once into uint8 tensors and hold out a seeded validation split (val_size
    images, at most a tenth of the training images; an image folder's own val/ folder instead,
    when it has one).

    `subset` caps every split at that many images (for quick runs and tests). An image folder's
    spec comes back complete (Splits.spec): its classes, channels, size, and channel mean and std
    computed on the training split. `listing`: see read_image_folder. Raises DatasetUnavailable
    (see read_dataset).
    """
    raw = read_dataset(spec, root, seed, image_size, cache_dir, show_progress, listing)
    x, y, test_x, test_y = raw["train_x"], raw["train_y"], raw["test_x"], raw["test_y"]
    if len(x) < 4:
        raise DatasetUnavailable(f"{spec.folder} has {len(x)} training images; at least 4 are needed")
    if "val_x" in raw:  # the folder's own val/
        val_x, val_y = raw["val_x"], raw["val_y"]
    else:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        val_size = max(1, min(val_size, len(x) // 10))
        val_idx, train_idx = perm[:val_size], perm[val_size:]
        val_x, val_y, x, y = x[val_idx], y[val_idx], x[train_idx], y[train_idx]
    if subset:
        x, y, val_x, val_y, test_x, test_y = (t[:subset] for t in (x, y, val_x, val_y, test_x, test_y))
    if spec.torchvision_class is None:  # a learner's folder: what its images say
        pixels = x.float().div(255).transpose(0, 1).reshape(x.shape[1], -1)
        side = x.shape[-1]
        spec = dataclasses.replace(
            spec, in_channels=x.shape[1], image_size=side, classes=tuple(raw["classes"]),
            mean=tuple(round(v, 4) for v in pixels.mean(1).tolist()),
            std=tuple(round(max(v, 1e-3), 4) for v in pixels.std(1).tolist()),
            pad=max(1, side // 8))
    return Splits(*(t.to(device) for t in (x, y, val_x, val_y, test_x, test_y)), spec=spec,
                  source=raw["source"])


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

# Seven architectures, each an nn.Module written from its paper and adapted to 28/32 px images (its
# docstring says how). Each maps a normalised batch N x C x H x W to class scores (logits)
# N x num_classes. The comments in each forward() give the tensor's shape after each stage for a
# CIFAR-10 batch (N x 3 x 32 x 32) at width 1.0, the papers' channel counts: `width` scales every
# channel count (ch), and the cpu preset trains every model but LeNet-5 at 0.25.


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

    The key idea of convolutional networks: small filters with shared weights, scanned over the
    image, find local features wherever they are, and subsampling (pooling) between convolution
    layers trades resolution for more abstract features, so that the whole net, from pixels to
    class scores, is trained end to end by backpropagation.

    C1 conv5x5 (6) -> S2 pool -> C3 conv5x5 (16) -> S4 pool -> C5 (120) -> F6 (84) -> output.
    Modern substitutions: ReLU for the scaled tanh, max pooling for trainable subsampling, full
    C3 connectivity, a linear output for the RBF layer. A 28x28 input is zero-padded by 2 in C1,
    which is exactly the paper's 32x32 field; a 32x32 input is used as is. The activation follows
    the pooling, as the paper's squashing follows its subsampling: ReLU and max commute, so this is
    the same function as ReLU-then-pool, with the ReLU on a quarter of the elements (LeNet-5 is
    bound by such elementwise passes on a CPU; benchmarks/cnn_benchmark.py).
    Other sizes (image folders): smaller ones are padded up to 32, larger ones widen C5's input.
    Input N x in_channels x image_size x image_size -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 image_size: int = 28):
        super().__init__()
        c1, c3, c5, f6 = ch(6, width), ch(16, width), ch(120, width), ch(84, width)
        pad = max(0, (32 - image_size) // 2)      # 28 -> 2: the paper's 32x32 field
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2  # S4's map: 5x5 at 28 and 32 px
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=pad),                          # C1
            nn.MaxPool2d(2), nn.ReLU(inplace=True),                              # S2
            nn.Conv2d(c1, c3, 5),                                                # C3
            nn.MaxPool2d(2), nn.ReLU(inplace=True))                              # S4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * side * side, c5), nn.ReLU(inplace=True),
            nn.Linear(c5, f6), nn.ReLU(inplace=True), nn.Linear(f6, num_classes))

    def forward(self, x):
        # Shapes for a CIFAR-10 batch at width 1.0; channels scale with `width` (both presets
        # train LeNet-5 at 1.0). An MNIST batch (N x 1 x 28 x 28) is padded by 2 in C1 and then
        # has these same shapes.
        #   x                         N x 3 x 32 x 32
        #   C1 conv 5x5               N x 6 x 28 x 28
        #   S2 max-pool, ReLU         N x 6 x 14 x 14
        #   C3 conv 5x5               N x 16 x 10 x 10
        #   S4 max-pool, ReLU         N x 16 x 5 x 5
        x = self.features(x)
        #   flatten                   N x 400
        #   C5, ReLU                  N x 120
        #   F6, ReLU                  N x 84
        return self.classifier(x)   # N x 10


class AlexNet(nn.Module):
    """AlexNet (Krizhevsky, Sutskever & Hinton, 2012, "ImageNet classification with deep
    convolutional neural networks"), in its usual small-image form.

    The network that made deep CNNs the standard for image recognition (ILSVRC-2012): a much deeper
    and wider net than LeNet-5, trainable because of ReLU activations (faster than saturating
    tanh), dropout against overfitting in its large fully connected layers, data augmentation, and
    GPU training.

    Five convolutions (64 11x11, 192 5x5, 384, 256, 256 3x3 channels in the paper) with three
    max-poolings, then two dropout fully connected layers (4096) and the output layer; conv2 keeps
    the paper's 5x5 kernel. For 28/32 px input the 11x11 stride-4 stem becomes a 3x3 stride-1 one
    (an 11x11/4 stem would shrink 32 px to 6 px before the first pool) and the 3x3 stride-2 pools
    2x2 ones; the last feature map is average-pooled to 2x2, so FC1 takes 256*2*2 inputs instead of
    256*6*6; BatchNorm stands where the paper had local response normalisation (it lets the shared
    recipe's learning rate train it) and the convolutions before it have no bias. At width 1.0 on
    3x32x32 that is torchvision's AlexNet less exactly these changes (tests/test_cnn.py).
    Input N x in_channels x H x W (H, W >= 8) -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = [ch(k, width) for k in (64, 192, 384, 256, 256)]
        fc = ch(4096, width)
        self.features = nn.Sequential(
            conv_bn(in_channels, c[0]), nn.MaxPool2d(2),
            conv_bn(c[0], c[1], kernel=5), nn.MaxPool2d(2),
            conv_bn(c[1], c[2]), conv_bn(c[2], c[3]), conv_bn(c[3], c[4]), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2))  # 28 px ends at 3x3, 32 px at 4x4: pool both to 2x2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(c[4] * 4, fc), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Linear(fc, num_classes))

    def forward(self, x):
        # Shapes for a CIFAR-10 batch at width 1.0; channels (and the 4096 units) scale with
        # `width`: the cpu preset's 0.25 keeps a quarter of each.
        #   x                         N x 3 x 32 x 32
        #   conv1 3x3, max-pool       N x 64 x 16 x 16
        #   conv2 5x5, max-pool       N x 192 x 8 x 8
        #   conv3, conv4 3x3          N x 384 x 8 x 8, N x 256 x 8 x 8
        #   conv5 3x3, max-pool       N x 256 x 4 x 4
        #   average pool              N x 256 x 2 x 2
        x = self.features(x)
        #   flatten                   N x 1024
        #   FC1, FC2 (dropout, ReLU)  N x 4096
        return self.classifier(x)   # N x 10


class VGG(nn.Module):
    """VGG-16 with batch normalisation (Simonyan & Zisserman, 2014, "Very deep convolutional
    networks for large-scale image recognition"; BN after Ioffe & Szegedy, 2015).

    Depth from small filters only: every convolution is 3x3 (two stacked 3x3 layers see a 5x5 field
    with fewer weights and one more ReLU), and each 2x2 max-pool halves the side while the next
    stage doubles the channels, up to 512, keeping the work per layer roughly even.

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
        # Shapes for a CIFAR-10 batch at width 1.0; channels scale with `width` (the cpu preset's
        # 0.25 keeps a quarter of each), the sides do not.
        #   x                                       N x 3 x 32 x 32
        #   stage 1: 2 convs 3x3                    N x 64 x 32 x 32
        #   max-pool, stage 2: 2 convs              N x 128 x 16 x 16
        #   max-pool, stage 3: 3 convs              N x 256 x 8 x 8
        #   max-pool, stage 4: 3 convs              N x 512 x 4 x 4
        #   max-pool, stage 5: 3 convs              N x 512 x 2 x 2
        #   global average pool, flatten            N x 512
        x = self.features(x)
        return self.classifier(x)   # N x 10


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation unit (Hu, Shen & Sun, 2018, "Squeeze-and-excitation networks").

    Attention over channels: each channel is squeezed to one number (its global average), a small
    bottleneck of two fully connected layers (C -> C/r -> C) turns these into one weight in (0, 1)
    per channel, and the feature map is rescaled by them, so the block learns which channels matter
    for this image at the cost of few parameters. As in the paper: reduction r = 16, ReLU then
    sigmoid; the hidden layer keeps at least 4 units (narrow networks).
    N x C x H x W -> same shape.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        # Shapes in SE-ResNet-18's third block on a CIFAR-10 batch at width 1.0 (x: N x 128 x 16 x 16);
        # channels scale with `width`.
        s = x.mean((2, 3))  # squeeze: N x 128 (a plain mean is much faster than adaptive pooling on CPU)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))  # excitation: N x 8 -> N x 128, in (0, 1)
        return x * s[:, :, None, None].to(x.dtype)  # each channel rescaled: N x 128 x 16 x 16


class BasicBlock(nn.Module):
    """ResNet basic block (He, Zhang, Ren & Sun, 2015, "Deep residual learning for image
    recognition").

    The residual connection: the two 3x3 conv-BN layers learn only a correction F(x) that is added
    to the block's input, out = ReLU(F(x) + x), so a block that has nothing to add can pass x on
    unchanged and gradients reach early layers through the shortcuts; this is what lets very deep
    networks train. When the block halves the side or widens the channels, the shortcut is a 1x1
    strided projection with BN (the paper's option B), else the identity; ReLU after the sum. With
    `se=True` a squeeze-and-excitation unit scales the residual branch before the sum, as in
    SE-ResNet (Hu et al., 2018). Nothing differs from the paper at 28/32 px.
    N x c_in x H x W -> N x c_out x H/stride x W/stride.
    """

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
        # Shapes in ResNet-18's third block (stage 2's first, stride 2) on a CIFAR-10 batch at
        # width 1.0, x: N x 64 x 32 x 32; channels scale with `width`.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)  # N x 128 x 16 x 16
        out = self.se(self.bn2(self.conv2(out)))  # F(x): N x 128 x 16 x 16
        return F.relu(out + self.shortcut(x), inplace=True)  # F(x) + projected x: N x 128 x 16 x 16


class ResNet(nn.Module):
    """ResNet-18 (He, Zhang, Ren & Sun, 2015, "Deep residual learning for image recognition").

    Deep networks built from residual blocks (BasicBlock): each block adds a learned correction to
    its input through a shortcut, which made networks of 18 to 152 layers (over 1000 on CIFAR-10)
    trainable where plain stacks got worse with depth.

    CIFAR form: a 3x3 stride-1 stem instead of 7x7/2 + max-pool (which would shrink 32 px to 8 px
    before the first stage), then four stages of two basic blocks (64, 128, 256, 512 channels;
    stride 2 at the start of stages 2-4), global average pooling and a linear classifier. The
    paper's own CIFAR-10 networks are narrower (three stages of 16, 32, 64 channels); this is the
    ImageNet ResNet-18 with that stem, as CIFAR-10 results are commonly reported for it. `se=True`
    gives SE-ResNet-18 (see SENet).
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
        # Shapes for a CIFAR-10 batch at width 1.0 (x: N x 3 x 32 x 32); channels scale with
        # `width` (the cpu preset's 0.25 keeps a quarter of each), the sides do not.
        x = self.stem(x)      # conv 3x3: N x 64 x 32 x 32
        #   stage 1 (2 blocks)          N x 64 x 32 x 32
        #   stage 2 (2 blocks)          N x 128 x 16 x 16
        #   stage 3 (2 blocks)          N x 256 x 8 x 8
        #   stage 4 (2 blocks)          N x 512 x 4 x 4
        x = self.stages(x)
        return self.head(x)   # global average pool N x 512, then N x 10


class SENet(ResNet):
    """SE-ResNet-18 (Hu, Shen & Sun, 2018, "Squeeze-and-excitation networks"): ResNet-18 whose
    every basic block recalibrates its channels with a squeeze-and-excitation unit (reduction 16).

    The paper's idea is that a network gains from weighing its own channels per image (channel
    attention) at little cost; its SE-ResNets are deeper (ResNet-50 and up on ImageNet), here the
    unit sits in the CIFAR-form ResNet-18 above (same stem, stages and shapes; see ResNet.forward and
    SqueezeExcitation.forward), placed as in the paper: on the residual branch, before the sum.
    Input N x in_channels x H x W -> logits N x num_classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0):
        super().__init__(in_channels, num_classes, width, se=True)


class Inception(nn.Module):
    """Inception module (Szegedy et al., 2014, "Going deeper with convolutions").

    Several receptive fields at once: four parallel branches, 1x1 | 1x1->3x3 | 1x1->5x5 |
    3x3 max-pool->1x1, concatenated on channels, so the next layer chooses among scales. The 1x1
    "reduce" convolutions shrink the channels before the costly 3x3 and 5x5 ones, which keeps the
    module cheap enough to stack nine times. Differs from the paper in that the 5x5 is two 3x3
    (the usual factorisation, from its BN-Inception successor) and every convolution has BN.
    N x c_in x H x W -> N x (n1 + n3 + n5 + pool_proj) x H x W.
    """

    def __init__(self, c_in, n1, n3_reduce, n3, n5_reduce, n5, pool_proj):
        super().__init__()
        self.branch1 = conv_bn(c_in, n1, 1)
        self.branch3 = nn.Sequential(conv_bn(c_in, n3_reduce, 1), conv_bn(n3_reduce, n3))
        self.branch5 = nn.Sequential(conv_bn(c_in, n5_reduce, 1), conv_bn(n5_reduce, n5),
                                     conv_bn(n5, n5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(c_in, pool_proj, 1))

    def forward(self, x):
        # Shapes in module 3a on a CIFAR-10 batch at width 1.0 (x: N x 192 x 16 x 16); channels
        # scale with `width`.
        #   branch1: 1x1                        N x 64 x 16 x 16
        #   branch3: 1x1 (96), 3x3              N x 128 x 16 x 16
        #   branch5: 1x1 (16), 3x3, 3x3         N x 32 x 16 x 16
        #   branch_pool: max-pool, 1x1          N x 32 x 16 x 16
        #   concatenated on channels            N x 256 x 16 x 16
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 (Szegedy, Liu, Jia, Sermanet, Reed, Anguelov, Erhan, Vanhoucke &
    Rabinovich, 2014, "Going deeper with convolutions"), with BN.

    A deep and wide network at a modest cost, built by stacking Inception modules (parallel 1x1,
    3x3, 5x5 convolutions and pooling, with 1x1 reductions; see Inception) instead of single
    convolutions, and ending in global average pooling instead of large fully connected layers.

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
        # Shapes for a CIFAR-10 batch at width 1.0 (x: N x 3 x 32 x 32); channels scale with
        # `width` (the cpu preset's 0.25 keeps a quarter of each), the sides do not.
        x = self.stem(x)        # conv 3x3 N x 192 x 32 x 32, max-pool N x 192 x 16 x 16
        #   3a, 3b                           N x 256 x 16 x 16, N x 480 x 16 x 16
        #   max-pool, 4a-4c                  N x 512 x 8 x 8
        #   4d, 4e                           N x 528 x 8 x 8, N x 832 x 8 x 8
        #   max-pool, 5a, 5b                 N x 832 x 4 x 4, N x 1024 x 4 x 4
        x = self.inception(x)
        return self.head(x)     # global average pool N x 1024, dropout, then N x 10


class SeparableConv2d(nn.Module):
    """Depthwise separable convolution (Chollet, 2017, "Xception: Deep learning with depthwise
    separable convolutions").

    A 3x3 convolution split in two: a depthwise 3x3 convolution filters each channel on its own
    (space), then a pointwise 1x1 convolution mixes the channels, with about 9*c_in + c_in*c_out
    weights instead of 9*c_in*c_out. As in the paper: no non-linearity between the two, BN after.
    N x c_in x H x W -> N x c_out x H x W.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        # Shapes in Xception's exit flow (1024 -> 1536) on a CIFAR-10 batch at width 1.0
        # (x: N x 1024 x 2 x 2); channels scale with `width`.
        x = self.depthwise(x)       # one 3x3 filter per channel: N x 1024 x 2 x 2
        x = self.pointwise(x)       # 1x1 across channels: N x 1536 x 2 x 2
        return self.bn(x)           # N x 1536 x 2 x 2


class XceptionBlock(nn.Module):
    """Xception residual block (Chollet, 2017, "Xception: Deep learning with depthwise separable
    convolutions").

    The building block of Xception: a stack of depthwise separable convolutions with a residual
    shortcut around it, as in ResNet. `reps` x (ReLU -> separable conv) with an identity shortcut,
    or, when the block changes width or resolution, a 3x3/2 max-pool and a 1x1 strided projection
    shortcut. `relu_first=False` drops the first ReLU (the entry flow's first block). The first
    separable conv widens c_in -> c_out (entry flow), or with `grow_first=False` the last one does
    (the exit flow's 728 -> 728 -> 1024, Fig. 5 of the paper). Nothing differs from the paper at
    28/32 px but the sides the blocks run at.
    N x c_in x H x W -> N x c_out x ceil(H/stride) x ceil(W/stride).
    """

    def __init__(self, c_in: int, c_out: int, reps: int, stride: int = 1, relu_first: bool = True,
                 grow_first: bool = True):
        super().__init__()
        layers = []
        widths = [c_in] + ([c_out] * reps if grow_first else [c_in] * (reps - 1) + [c_out])
        for i in range(reps):
            if i > 0 or relu_first:
                layers.append(nn.ReLU(inplace=False))
            layers.append(SeparableConv2d(widths[i], widths[i + 1]))
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.residual = nn.Sequential(*layers)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        # Shapes in the entry flow's second block (128 -> 256, stride 2) on a CIFAR-10 batch at
        # width 1.0 (x: N x 128 x 16 x 16); channels scale with `width`.
        #   ReLU, separable conv              N x 256 x 16 x 16
        #   ReLU, separable conv              N x 256 x 16 x 16
        #   max-pool 3x3/2                    N x 256 x 8 x 8
        #   shortcut: 1x1 conv stride 2, BN   N x 256 x 8 x 8
        return self.residual(x) + self.shortcut(x)  # N x 256 x 8 x 8


class Xception(nn.Module):
    """Xception (Chollet, 2017, "Xception: Deep learning with depthwise separable convolutions").

    "Extreme Inception": where an Inception module looks at channels and space in a few separate
    branches, Xception separates them completely, using depthwise separable convolutions (see
    SeparableConv2d) throughout, in residual blocks (XceptionBlock); with about as many parameters
    as Inception v3 it did better on ImageNet.

    Entry flow: two 3x3 convolutions (32, 64) and three strided blocks (128, 256, 728); middle flow:
    `middle_blocks` (8 in the paper) residual blocks of three 728-wide separable convolutions; exit
    flow: a strided block (separable convolutions 728 -> 728 -> 1024), separable convolutions 1536
    and 2048, global average pooling and a linear classifier. For 28/32 px input the stem
    convolutions have stride 1 and 'same' padding (the paper's first one has stride 2 on 299 px), so
    the middle flow runs at 1/8 of the input side. At width 1.0 the parameters equal timm's
    legacy_xception (20,827,442 at 10 classes).
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
            XceptionBlock(c728, c1024, 2, stride=2, grow_first=False),
            SeparableConv2d(c1024, c1536), nn.ReLU(inplace=True),
            SeparableConv2d(c1536, c2048), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2048, num_classes))

    def forward(self, x):
        # Shapes for a CIFAR-10 batch at width 1.0 (x: N x 3 x 32 x 32); channels scale with
        # `width` (the cpu preset's 0.25 keeps a quarter of each), the sides do not.
        #   convs 3x3 (32, 64)                N x 64 x 32 x 32
        #   blocks 128, 256, 728 (stride 2)   N x 128 x 16 x 16, N x 256 x 8 x 8, N x 728 x 4 x 4
        x = self.entry_flow(x)
        x = self.middle_flow(x)  # 8 blocks: N x 728 x 4 x 4
        #   block 728 -> 1024 (stride 2)      N x 1024 x 2 x 2
        #   separable convs 1536, 2048        N x 1536 x 2 x 2, N x 2048 x 2 x 2
        #   global average pool               N x 2048
        return self.exit_flow(x)  # N x 10


# The --models names: each gives the name tables and plots use and builds its class above,
# constructor(in_channels, num_classes, width, image_size) -> nn.Module ('senet' is the ResNet
# class with squeeze-and-excitation units: SENet).
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

def parameter_groups(model: nn.Module, weight_decay: float):
    """Weight decay on conv/linear weights only; biases and norm scales/shifts are not decayed."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: dict, total_steps: int, fused: bool | None = None):
    """The shared recipe's SGD (Nesterov) and one-cycle schedule for `total_steps` steps.

    fused: torch's fused SGD kernel (one kernel for all parameters); None = only for parameters on
    a GPU, where it saves a launch per parameter. On the CPU it was no faster than the default SGD
    in benchmarks/cnn_benchmark.py (docs/benchmarks.md), so the default is kept there.
    """
    if fused is None:
        fused = next(model.parameters()).is_cuda
    kwargs = dict(lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    try:
        optimizer = torch.optim.SGD(parameter_groups(model, cfg["weight_decay"]), fused=fused, **kwargs)
    except (RuntimeError, TypeError):  # an older torch or a device without the fused kernel
        optimizer = torch.optim.SGD(parameter_groups(model, cfg["weight_decay"]), **kwargs)
    warmup = cfg["warmup_fraction"]
    if math.isclose(warmup * total_steps, 1.0):
        # OneCycleLR divides by (warmup * total_steps - 1): at exactly one warm-up step (5 steps
        # at 20%) it raises ZeroDivisionError. Half a step more keeps every schedule length legal.
        warmup = 1.5 / total_steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg["lr"], total_steps=total_steps,
        pct_start=warmup, anneal_strategy="linear",
        base_momentum=0.85, max_momentum=cfg["momentum"])
    return optimizer, scheduler


def epoch_batches(n_train: int, batch_size: int) -> tuple:
    """(steps, images per step) of one epoch: full batches, the ragged last one dropped. A
    training split smaller than one batch (a small image folder) is one step of its images, cut to
    a multiple of 8: oneDNN's backward of a strided 1x1 convolution in channels_last (ResNet's
    projection shortcut) crashes the process on batches of other sizes when it has few input
    channels (torch 2.11 and 2.14 on the CPU; docs/cnn_project.md)."""
    if n_train >= batch_size:
        return n_train // batch_size, batch_size
    return 1, n_train - n_train % 8 if n_train >= 8 else n_train


@dataclass
class Trainee:
    """One run set up for training with the shared recipe (setup_training): the (accelerate-prepared)
    model, optimizer, one-cycle scheduler, loss, the shuffle/augment generators, the accelerator,
    the dataset's spec and the recipe; the schedule's length and the model's cost, counted once
    before training; and how the run is shown and kept (train_one sets these)."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: nn.Module
    generators: dict
    accelerator: object
    spec: DatasetSpec
    cfg: dict
    steps_per_epoch: int
    images_per_epoch: int
    params: int = 0
    macs_per_image: int = 0            # forward multiply-adds per image (count_flops / 2)
    train_flops_per_image: float = 0.0   # forward + backward FLOPs per training image
    label: str = ""                    # how the log names the run: 'ResNet-18 / cifar10'
    show_progress: bool = False        # a progress bar per epoch (main process, on a terminal)
    checkpoint: Path | None = None     # where the training state goes after every epoch (or None)
    settings: dict | None = None       # the run's settings, kept in (and checked against) it
    stop_at_val_accuracy: float | None = None  # end after the first epoch reaching it, in [0, 1]


def setup_training(model_name: str, spec: DatasetSpec, n_train: int, epochs: int, width: float,
                   cfg: dict, accelerator, seed: int) -> Trainee:
    """Seed everything, build the model (channels_last, on the accelerator's device), count its
    cost, and make its optimizer and schedule for `epochs` passes over `n_train` images.
    Raises ValueError if the batch does not split evenly over the processes."""
    from accelerate.utils import set_seed
    set_seed(seed)
    world = accelerator.num_processes
    if cfg["batch_size"] % world:
        raise ValueError(f"--batch-size {cfg['batch_size']} must be a multiple of the number of "
                         f"processes ({world})")
    model = build_model(model_name, spec.in_channels, len(spec.classes), width, spec.image_size)
    model = model.to(memory_format=torch.channels_last)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    macs, train_flops = count_flops(model, shape) / 2, count_flops(model, shape, backward=True)
    steps_per_epoch, batch = epoch_batches(n_train, cfg["batch_size"])
    model = model.to(accelerator.device)  # before the optimizer, which picks its kernel by device
    optimizer, scheduler = make_optimizer(model, cfg, epochs * steps_per_epoch)
    # The scheduler is not handed to accelerate: it would step it once per process, for a batch
    # that grows with the processes; here the global batch is split, so one step is one step.
    prepared, optimizer = accelerator.prepare(model, optimizer)
    # Shuffling: one generator seeded alike on every process, so all agree on each global batch and
    # each takes its own slice of it (DDP averages the gradients: the step is that of the whole
    # batch). Augmentation: a generator of each process's own. Both on the CPU, for reproducibility.
    generators = {"shuffle": torch.Generator().manual_seed(seed),
                  "augment": torch.Generator().manual_seed(seed + 1 + accelerator.process_index)}
    return Trainee(prepared, optimizer, scheduler,
                   nn.CrossEntropyLoss(label_smoothing=cfg["label_smoothing"]), generators,
                   accelerator, spec, cfg, steps_per_epoch, steps_per_epoch * batch,
                   sum(p.numel() for p in model.parameters()), int(macs), float(train_flops),
                   label=f"{MODELS_REGISTRY[model_name][0]} / {spec.name}")


def new_progress() -> dict:
    """What a run has learned so far and what a checkpoint keeps of it: the per-epoch history, the
    best validation epoch and its weights, and the training seconds at which the target was hit."""
    return {"history": {k: [] for k in ("epoch", "train_loss", "train_accuracy", "val_loss",
                                        "val_accuracy", "lr", "epoch_time_s")},
            "best_epoch": 0, "best_val_accuracy": -1.0, "best_state": None, "time_to_target": None}


def fit(t: Trainee, data: Splits, epochs: int, progress: dict) -> None:
    """The training loop: train `t.model` on data.train_x / data.train_y from the epoch after
    `progress`'s last (none yet, or a checkpoint's) to `epochs`, updating `progress` in place.

    Each batch (uint8 images N x C x H x W and labels N, this process's share of a shuffled global
    batch) is augmented and normalised, goes forward under autocast, and the gradient of its mean
    label-smoothed cross-entropy (nats) goes backward; then one SGD step and one step of the
    one-cycle schedule. After each epoch: validation, the best epoch's weights kept (a copy), the
    checkpoint written, one line printed. Raises TrainingDiverged (loss non-finite or at chance).
    """
    model, optimizer, scheduler, spec = t.model, t.optimizer, t.scheduler, t.spec
    accelerator, generator = t.accelerator, t.generators["augment"]
    history, target = progress["history"], TARGET_VAL_ACCURACY.get(spec.name)
    for epoch in range(len(history["epoch"]) + 1, epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=data.train_y.device)  # summed over this process's images
        correct = torch.zeros((), device=data.train_y.device, dtype=torch.int64)
        for step, (x, y) in enumerate(process_batches(t, data, f"{t.label} epoch {epoch}/{epochs}")):
            x = normalize(augment(x, spec, generator), spec)  # float N x C x H x W, channels_last
            with accelerator.autocast():                      # bf16/fp16 where the hardware has it
                logits = model(x)                             # N x num_classes
                loss = t.criterion(logits.float(), y)         # mean over the batch
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)  # loss.backward(); under DDP the gradients are averaged
            optimizer.step()
            scheduler.step()            # the one-cycle schedule moves every step
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            check_finite(loss_sum, step, epoch, accelerator)  # every 50 steps
        loss_sum, correct = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(correct, "sum")
        train_loss = (loss_sum / t.images_per_epoch).item()
        train_acc = (correct.float() / t.images_per_epoch).item()
        epoch_time = time.perf_counter() - start
        val_loss, val_acc, _, _ = evaluate(model, data.val_x, data.val_y, spec, accelerator,
                                           t.cfg["eval_batch_size"])
        for k, v in zip(history, (epoch, train_loss, train_acc, val_loss, val_acc,
                                  scheduler.get_last_lr()[0], epoch_time)):
            history[k].append(v)
        check_divergence(epoch, t.steps_per_epoch, train_loss, val_acc, len(spec.classes))
        if val_acc > progress["best_val_accuracy"]:  # keep the best epoch's weights
            progress.update(best_val_accuracy=val_acc, best_epoch=epoch, best_state=copy.deepcopy(
                accelerator.unwrap_model(model).state_dict()))
        if progress["time_to_target"] is None and target is not None and val_acc >= target:
            progress["time_to_target"] = sum(history["epoch_time_s"])
        save_checkpoint(t, progress)  # a rerun resumes after this epoch
        accelerator.print(f"  {t.label} epoch {epoch:>2}/{epochs}: train loss {train_loss:.4f} acc "
                          f"{train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} | "
                          f"{epoch_time:.1f}s", flush=True)
        if t.stop_at_val_accuracy is not None and val_acc >= t.stop_at_val_accuracy:
            break


@torch.no_grad()
def evaluate(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, spec: DatasetSpec,
             accelerator, batch_size: int):
    """Score a model on uint8 images N x C x H x W with labels N.

    With several processes each scores every num_processes-th image, after taking process 0's
    BatchNorm running statistics, and the results are gathered, so every process returns the same.
    Returns (mean cross-entropy in nats without label smoothing, accuracy in [0, 1],
    predicted labels as an int64 CPU tensor of length N, the softmax probability of each predicted
    label as a float32 CPU tensor of length N).
    """
    module = accelerator.unwrap_model(model)  # no DDP hooks: the shards may differ by one batch
    module.eval()
    world = accelerator.num_processes
    if world > 1:  # DDP keeps parameters equal, not the running statistics of each process
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
    idx = torch.arange(accelerator.process_index, len(y), world, device=y.device)
    loss_sum = torch.zeros((), device=y.device)
    preds, confidence = [], []
    for i in range(0, len(idx), batch_size):
        x = normalize(x_uint8[idx[i:i + batch_size]], spec)
        with accelerator.autocast():
            logits = module(x).float()
        loss_sum += F.cross_entropy(logits, y[idx[i:i + batch_size]], reduction="sum")
        p, label = logits.softmax(1).max(1)
        preds.append(label)
        confidence.append(p)
    preds = torch.cat(preds) if preds else y[:0]
    confidence = torch.cat(confidence) if confidence else y[:0].float()
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
        gathered_idx = accelerator.gather(accelerator.pad_across_processes(idx, pad_index=-1))
        keep = gathered_idx >= 0
        local = (preds, confidence)
        preds, confidence = torch.empty_like(y), torch.empty(len(y), device=y.device)
        for out, mine in zip((preds, confidence), local):
            out[gathered_idx[keep]] = accelerator.gather(
                accelerator.pad_across_processes(mine, pad_index=-1))[keep].to(out.dtype)
    return ((loss_sum / len(y)).item(), (preds == y).float().mean().item(), preds.cpu(),
            confidence.cpu())


def train_one(model_name: str, spec: DatasetSpec, data: Splits, epochs: int, width: float,
              cfg: dict, accelerator, seed: int, show_progress: bool = True,
              stop_at_val_accuracy: float | None = None, checkpoint: Path | None = None,
              settings: dict | None = None) -> tuple:
    """Train one architecture on one dataset with the shared recipe: set up, fit, score.

    Returns (record, best_state): the result record (plain types, see RESULTS) and the state_dict
    of the epoch with the best validation accuracy, which is restored before the test set is scored
    (None if the run failed). `stop_at_val_accuracy` (in [0, 1]) ends training after the first
    epoch whose validation accuracy reaches it (time-to-accuracy runs). With `checkpoint`, the
    complete training state is written there atomically after every epoch (by the main process),
    and a checkpoint already there whose settings equal `settings` is resumed from its last epoch:
    on one CPU process the result is then bit-identical to an uninterrupted run. A diverged run
    returns a record with status 'failed' and the reason instead of raising.
    """
    t = setup_training(model_name, spec, len(data.train_y), epochs, width, cfg, accelerator, seed)
    t.show_progress, t.stop_at_val_accuracy = show_progress, stop_at_val_accuracy
    t.checkpoint, t.settings = checkpoint, settings
    progress = restore_checkpoint(t) or new_progress()
    failure = None
    try:
        fit(t, data, epochs, progress)
    except TrainingDiverged as err:
        accelerator.print(f"  {t.label}: FAILED, {err}", flush=True)
        failure = str(err)
    record = make_record(model_name, spec, t, progress, failure)
    if failure:
        return record, None
    accelerator.unwrap_model(t.model).load_state_dict(progress["best_state"])
    record["confidence_threshold"] = confidence_threshold(t.model, data, spec, cfg, accelerator)
    record["test"] = score_test(t.model, data, spec, cfg, accelerator)
    return record, progress["best_state"]


# #############################################################################################
# ===== THE MACHINERY: everything below supports the lesson above =====
# Reading data files and image folders, the training loop's helpers, precision, cost and test
# scores, checkpoints, results, comparison, report, --predict and the command line.
# #############################################################################################

# =============================================================================================
# IMAGE FOLDERS (torchvision's files, a learner's own image folder, a copy of CIFAR-10)
# =============================================================================================

RESERVED_FOLDERS = ("plots", "superseded", "unreadable", "inspection")  # the program's own folders under results/cnn
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FOLDER_TEST_FRACTION = 0.2  # a folder without train/ and test/: this share of each class is test
CACHE_FORMAT = "cnn_project/folder-cache/1"


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable (offline), or an image folder is unusable."""


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
        copies = (f", or put an image-folder copy (train/<class>/*, test/<class>/*) in "
                  f"{' or '.join(str(Path(root).resolve() / f) for f in spec.image_folders)}"
                  if spec.image_folders else "")
        raise DatasetUnavailable(
            f"Dataset '{spec.name}' is not in {where} and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). "
            f"torchvision expects the files {', '.join(spec.files)} in that folder. Either connect "
            f"to the internet and run again (torchvision downloads it), copy the files there"
            f"{copies}, or point --data-dir at the folder that holds "
            f"'{spec.folder.split('/')[0]}'.") from None
    images = ds.data
    images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if images.ndim == 3:                      # MNIST-like: N x H x W
        images = images.unsqueeze(1)
    else:                                     # CIFAR: N x H x W x C (numpy)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return images.contiguous(), labels


def read_dataset(spec: DatasetSpec, root: str, seed: int, image_size: int | None,
                 cache_dir: str | None, show_progress: bool, listing: tuple | None = None) -> dict:
    """{'train_x', 'train_y', 'test_x', 'test_y', 'classes', 'source'}: uint8 N x C x H x W images
    and int64 labels of the copy data_source picks. A copy of a torchvision dataset must have its
    classes, channels and size. Raises DatasetUnavailable."""
    folder = data_source(spec, root)
    if folder is None:
        x, y = _torchvision_split(spec, root, train=True)
        test_x, test_y = _torchvision_split(spec, root, train=False)
        return {"train_x": x, "train_y": y, "test_x": test_x, "test_y": test_y,
                "classes": list(spec.classes),
                "source": {"kind": "torchvision", "class": spec.torchvision_class,
                           "path": str((Path(root) / spec.folder).resolve()),
                           "files": list(spec.files)}}
    raw = read_image_folder(Path(folder), image_size, seed, cache_dir, show_progress, listing)
    if spec.torchvision_class is not None:
        got = (tuple(raw["classes"]), raw["train_x"].shape[1], raw["train_x"].shape[-1])
        if got != (spec.classes, spec.in_channels, spec.image_size):
            raise DatasetUnavailable(
                f"{folder} is not a copy of {spec.title}: it has classes {', '.join(got[0])} at "
                f"{got[1]}x{got[2]}x{got[2]}, {spec.title} has {', '.join(spec.classes)} at "
                f"{spec.in_channels}x{spec.image_size}x{spec.image_size}")
    return raw


NOT_DATA = ("__MACOSX", "Thumbs.db", "desktop.ini", "$RECYCLE.BIN", "System Volume Information")
VAL_FOLDERS = ("val", "valid", "validation")  # beside train/ and test/: the validation split
_SKIP_REPORTED = set()  # (folder, kind) of the lines folder_layout already printed in this process


def _is_data(p: Path) -> bool:
    """Whether a folder entry can be data: not hidden ('.name', macOS's '._name'), not OS metadata."""
    return not p.name.startswith(".") and p.name not in NOT_DATA


def shown(path) -> str:
    """A path or file name as text that prints anywhere: bytes of a name that are not UTF-8 (kept
    by Python as surrogate escapes) appear as \\xNN; every other name is unchanged."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class FolderScan:
    """What folder_layout meets while it walks an image folder. `trees`: the real paths of the
    folders it reads (every class folder, every linked folder followed), so that a symbolic link
    is followed once: a link into one of them, or to a folder that holds one, would list the same
    images again (a loop). The entries left out, by reason: `skipped` (hidden, OS metadata,
    another file type), `loops`, `dangling` (links to nothing), `twice` ((path, the path of the
    same real file that is kept)), `merged` (class folder names equal once in Unicode NFC)."""
    root: Path
    trees: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    loops: list = dataclasses.field(default_factory=list)
    dangling: list = dataclasses.field(default_factory=list)
    twice: list = dataclasses.field(default_factory=list)
    merged: list = dataclasses.field(default_factory=list)

    def follow(self, link: Path) -> Path | None:
        """The real path behind a symbolic link, or None (the link noted) when it leads nowhere
        or to a folder that overlaps one already read; a folder followed joins `trees`."""
        real = Path(os.path.realpath(link))
        if not real.exists():
            self.dangling.append(link)
            return None
        if real.is_dir():
            if any(real.is_relative_to(t) or t.is_relative_to(real) for t in self.trees):
                self.loops.append(link)
                return None
            self.trees.append(real)
        return real


def _class_images(folder: Path, scan: FolderScan) -> list:
    """[(path, real path, whether the file is a link)] of the image files under one class folder,
    sorted by path: sub-folders and symbolic links followed once (FolderScan.follow); what is not
    data or has another extension goes to scan.skipped. Raises DatasetUnavailable (one line) for
    a folder that cannot be read."""
    images, todo = [], [(folder, os.path.realpath(folder))]
    while todo:
        here, real_here = todo.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            raise DatasetUnavailable(f"{shown(here)} could not be read ({err.strerror})") from None
        for e in entries:
            p = here / e.name
            if not _is_data(p):
                scan.skipped.append(p)
                continue
            real = scan.follow(p) if e.is_symlink() else os.path.join(real_here, e.name)
            if real is None:
                continue
            if os.path.isdir(real) if e.is_symlink() else e.is_dir():  # e.is_dir(): no stat call
                todo.append((p, str(real)))
            elif p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append((p, str(real), e.is_symlink()))
            else:
                scan.skipped.append(p)
    return sorted(images)


def class_name(folder_name: str) -> str:
    """A class folder's name as its class: in Unicode NFC (the same accented name typed on macOS,
    NFD, and elsewhere, NFC, is one class), bytes that are not UTF-8 shown as \\xNN."""
    return unicodedata.normalize("NFC", shown(folder_name))


def _split_folders(root: Path, scan: FolderScan) -> dict:
    """{split: folder} of an image folder: train/, test/ and (if there) val/ (or valid/,
    validation/), or {'train': root} when the class folders are in root itself; root's other
    entries beside train/ and test/ go to scan.skipped. Raises DatasetUnavailable for train/
    without test/ or the reverse."""
    parts = {"train": root / "train", "test": root / "test"}
    if parts["train"].is_dir() != parts["test"].is_dir():
        has, lacks = ("train", "test") if parts["train"].is_dir() else ("test", "train")
        raise DatasetUnavailable(f"image folder {shown(root)} has {has}/ but no {lacks}/: add "
                                 f"{lacks}/<class>/ folders, or put the class folders directly in "
                                 f"{shown(root)} to split them {1 - FOLDER_TEST_FRACTION:.0%}/"
                                 f"{FOLDER_TEST_FRACTION:.0%}")
    if not parts["train"].is_dir():
        return {"train": root}
    val = next((root / v for v in VAL_FOLDERS if (root / v).is_dir()), None)
    if val is not None:
        parts["val"] = val
    scan.skipped += sorted(p for p in root.iterdir() if p not in parts.values())
    return parts


def _class_folders(parts: dict, scan: FolderScan) -> dict:
    """{split: {class: [class folders]}}, classes in the order of their folders' sorted names
    (torchvision ImageFolder's rule), named by class_name; a class folder that is a symbolic link
    is followed unless it leads nowhere or into another class folder (FolderScan.follow). The
    other entries go to scan."""
    entries = {split: sorted(folder.iterdir(), key=lambda d: d.name)
               for split, folder in parts.items()}
    scan.trees += [Path(os.path.realpath(d)) for es in entries.values() for d in es
                   if _is_data(d) and not d.is_symlink() and d.is_dir()]
    found = {}
    for split, es in entries.items():
        classes = found[split] = {}
        for d in es:
            if d.is_symlink() and _is_data(d) and scan.follow(d) is None:
                continue  # a link to nothing or back into the folder: noted by follow
            if _is_data(d) and d.is_dir():
                classes.setdefault(class_name(d.name), []).append(d)
            else:
                scan.skipped.append(d)
        scan.merged += [folders for folders in classes.values() if len(folders) > 1]
    return found


def _count_once(files: dict, scan: FolderScan) -> dict:
    """{split: [(path, class index)]} keeping each real file once across every split: where one
    file is reached by several paths (symbolic links), the path that is not a link wins, else the
    first (train before test); the others go to scan.twice."""
    owner = {}
    for listed in files.values():
        for p, real, is_link, _ in listed:
            if real not in owner or (owner[real][1] and not is_link):
                owner[real] = (p, is_link)
    kept = {}
    for split, listed in files.items():
        kept[split] = [(p, k) for p, real, _, k in listed if owner[real][0] is p]
        scan.twice += [(p, owner[real][0]) for p, real, _, _ in listed if owner[real][0] is not p]
    return kept


def folder_layout(root: Path) -> dict:
    """{'train': [(path, class index)], 'test': [...] or None, 'val': [...] or None, 'classes':
    (...), 'skipped': [...]} of an image folder: <root>/train/<class>/* and <root>/test/<class>/*
    (and <root>/val/<class>/*, the validation split, when there), or <root>/<class>/* (split later
    by split_folder). Classes are the sorted sub-folder names (torchvision ImageFolder's rule) in
    Unicode NFC (class_name; two folders of one name in NFC and NFD are one class). Symbolic links
    are followed once and every real file is listed once (FolderScan, _count_once). Hidden files
    and folders, OS metadata (__MACOSX/, macOS's ._ files, Thumbs.db), files without an image
    extension, links to nothing or back into the folder are skipped and reported once, a line per
    reason. Raises DatasetUnavailable (one line naming the folder) for a missing folder, train/
    without test/ (or the reverse), an empty class folder, fewer than two classes, or splits
    with different classes."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetUnavailable(f"image folder {shown(root)} does not exist")
    scan = FolderScan(root)
    parts = _split_folders(root, scan)
    folders = _class_folders(parts, scan)
    classes = tuple(folders["train"])
    files = {}
    for split, by_class in folders.items():
        if len(by_class) < 2:
            raise DatasetUnavailable(f"image folder {shown(parts[split])} has {len(by_class)} class "
                                     f"sub-folder{'s' * (len(by_class) != 1)}; it needs one per "
                                     f"class, at least two")
        if set(by_class) != set(classes):
            raise DatasetUnavailable(f"{shown(parts['train'])} and {shown(parts[split])} have "
                                     f"different class folders")
        files[split] = [(*image, k) for k, name in enumerate(classes)
                        for d in by_class[name] for image in _class_images(d, scan)]
    files = _count_once(files, scan)
    for split, by_class in folders.items():
        empty = set(range(len(classes))) - {k for _, k in files[split]}
        if empty:
            raise DatasetUnavailable(f"class folder {shown(by_class[classes[min(empty)]][0])} holds "
                                     f"no images ({', '.join(IMAGE_EXTENSIONS)})")
    report_scan(scan, parts.get("val"))
    return {"train": files["train"], "test": files.get("test"), "val": files.get("val"),
            "classes": classes, "skipped": scan.skipped}


def _say_once(root: Path, kind: str, line: str) -> None:
    """Print one line about an image folder, once per process for each kind of line."""
    if (Path(root).resolve(), kind) not in _SKIP_REPORTED:
        _SKIP_REPORTED.add((Path(root).resolve(), kind))
        print(f"{shown(root)}: {line}", flush=True)


def _some(paths: list, root: Path, show=lambda p, rel: rel) -> str:
    """The first four entries, relative to root ('cat/loop/'), and ', ...' when there are more."""
    rel = [show(p, shown(p.relative_to(root).as_posix()) + "/" * (p.is_dir() and not p.is_symlink()))
           for p in paths[:4]]
    return ", ".join(rel) + (", ..." if len(paths) > 4 else "")


def report_scan(scan: FolderScan, val: Path | None) -> None:
    """One line per kind of entry folder_layout left out or joined (see FolderScan), each printed
    once per folder and process, and one saying that `val` (val/), if any, is the validation split."""
    root = scan.root
    if scan.skipped:
        one = len(scan.skipped) == 1
        _say_once(root, "skipped", f"skipped {len(scan.skipped)} {'entry' if one else 'entries'} "
                  f"that {'is' if one else 'are'} not an image of a class folder (hidden, OS "
                  f"metadata or another file type): {_some(scan.skipped, root)}")
    arrow = lambda p, rel: f"{rel} -> {shown(os.readlink(p))}"
    if scan.loops:
        _say_once(root, "loops", f"skipped {_count(len(scan.loops), 'symbolic link')} to a folder "
                  f"already read (a loop, or the same images a second time): "
                  f"{_some(scan.loops, root, arrow)}")
    if scan.dangling:
        _say_once(root, "dangling", f"skipped {_count(len(scan.dangling), 'symbolic link')} to "
                  f"nothing (in a git-annex or DVC checkout: files not fetched yet; `git annex get .` or "
                  f"`dvc pull` fetches them): {_some(scan.dangling, root, arrow)}")
    if scan.twice:
        same = lambda p, rel: f"{rel} (= {shown(dict(scan.twice)[p].relative_to(root).as_posix())})"
        _say_once(root, "twice", f"{_count(len(scan.twice), 'file')} reached a second time through "
                  f"symbolic links, counted once: {_some([p for p, _ in scan.twice], root, same)}")
    for folders in scan.merged:
        names = " and ".join(ascii(d.name) for d in folders)
        _say_once(root, f"merged {folders[0]}", f"the class folders {names} are one name in "
                  f"different Unicode forms (NFC, NFD): one class, {class_name(folders[0].name)}, "
                  f"with the images of all")
    if val is not None:
        _say_once(root, "val", f"{shown(val.name)}/ is the validation split (instead of a seeded "
                  f"share of train/)")


def split_folder(files: list, seed: int) -> tuple:
    """Seeded, per class: FOLDER_TEST_FRACTION of each class's files (at least one) to the test
    split, the rest to training. Returns (train files, test files)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in sorted({c for _, c in files}):
        mine = [f for f in files if f[1] == k]
        order = rng.permutation(len(mine))
        n_test = max(1, round(FOLDER_TEST_FRACTION * len(mine))) if len(mine) > 1 else 0
        test += [mine[i] for i in sorted(order[:n_test])]
        train += [mine[i] for i in sorted(order[n_test:])]
    return train, test


@functools.lru_cache(maxsize=1)
def _jpeg_quality_tables() -> dict:
    """{luminance quantisation table: quality 1-100} of the IJG encoder that Pillow uses."""
    from PIL import Image
    tables = {}
    for q in range(1, 101):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, "JPEG", quality=q)
        tables.setdefault(tuple(Image.open(buf).quantization[0]), q)
    return tables


def jpeg_quality(img) -> int | None:
    """The IJG quality (1-100) a Pillow JPEG image was saved with, or None (not a JPEG, or a
    non-standard table)."""
    table = getattr(img, "quantization", None) or {}
    return _jpeg_quality_tables().get(tuple(table[0])) if 0 in table else None


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
ALPHA_BACKGROUND = "white"  # transparent pixels are composited onto this, in training and --predict


def open_image(data: bytes, name: str):
    """One image file's bytes as the pixels both training and --predict see: a Pillow image in mode
    'L' (grey sources) or 'RGB', with the EXIF orientation applied (a phone photo stands as it was
    taken), transparency composited onto ALPHA_BACKGROUND, palette and CMYK images converted, 16-bit
    and 32-bit grey rescaled to 0-255 (not clipped to white). Also returns the file's format
    ('PNG', 'JPEG q75'). Raises ValueError (one line naming `name`) for a file Pillow cannot read
    and for one larger than Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)."""
    import warnings
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                quality = jpeg_quality(img) if img.format == "JPEG" else None
                fmt = f"JPEG q{quality}" if quality else str(img.format)
                img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{name} is too large to be a training or test image ({err.args[0].split('pixels')[0].strip()} "
                         f"pixels; the limit is {Image.MAX_IMAGE_PIXELS}, Pillow's guard against "
                         f"decompression bombs)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"{name} is not an image Pillow can read ({type(err).__name__})") from None
    grey = img.mode in GREY_MODES or (img.mode == "P" and _palette_is_grey(img))
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit grey: rescale, do not clip
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        img = Image.fromarray((values.clip(0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND), rgba)
    return img.convert("L" if grey else "RGB"), fmt


def _palette_is_grey(img) -> bool:
    """Whether a palette ('P') image uses only grey colours."""
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def decode_images(files: list, root: Path, image_size: int | None, show_progress: bool,
                  expect_side: int | None = None) -> dict:
    """Decode image files once with Pillow into uint8 N x 3 x H x W (or N x 1 x H x W when every
    image is grey), with their labels, their formats ('PNG', 'JPEG q75') and a content hash
    (sha256 over the lines '<sha256 of the file>  <path relative to root>', in the files' order).
    image_size None: every image must be square and of one size (expect_side's, else the first
    image's); else each is resized (Lanczos) to image_size x image_size. Raises DatasetUnavailable
    naming the file that cannot be read, is not an image, is not square, or is of another size."""
    from PIL import Image
    from tqdm.auto import tqdm
    arrays, grey, formats, digest = [], True, set(), hashlib.sha256()
    side, reference = expect_side, "the training images are"
    for path, _ in tqdm(files, desc="decoding images", leave=False, disable=not show_progress):
        try:
            data = Path(path).read_bytes()
        except OSError as err:  # removed or made unreadable since the folder was listed
            raise DatasetUnavailable(f"{shown(path)} could not be read ({err.strerror}); run again "
                                     f"once the folder is settled") from None
        try:
            img, fmt = open_image(data, shown(path))
        except ValueError as err:
            raise DatasetUnavailable(f"{err}; remove it from the folder") from None
        formats.add(fmt)
        grey &= img.mode == "L"
        rgb = img.convert("RGB")
        w, h = rgb.size
        if image_size:
            if rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), Image.Resampling.LANCZOS)
        elif w != h:
            raise DatasetUnavailable(f"{shown(path)} is {w}x{h}, not square: pass --image-size N "
                                     f"to resize every image to N x N")
        elif side is None:
            side, reference = w, f"{shown(path)} is"
        elif w != side:
            raise DatasetUnavailable(
                f"{shown(path)} is {w}x{h} but {reference} {side}x{side}: the images have mixed sizes; "
                f"pass --image-size N to resize every image to N x N")
        arrays.append(np.asarray(rgb))
        rel = Path(path).relative_to(root).as_posix()
        digest.update(f"{hashlib.sha256(data).hexdigest()}  {rel}\n".encode("utf-8",
                                                                           "surrogateescape"))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return {"x": (x[:, :1] if grey else x).contiguous(),
            "y": torch.tensor([k for _, k in files], dtype=torch.int64),
            "sha256": digest.hexdigest(), "formats": sorted(formats)}


def folder_listing(root: Path, image_size: int | None, seed: int) -> tuple:
    """(layout, train files, test files, key) of an image folder (its val/ files, if any, are
    layout['val']): the key (20 hex digits) hashes every file's path, class, size and mtime with
    image_size (and the seed, for a folder split by split_folder), so it changes when the folder
    does; it names the cache and a run's data."""
    layout = folder_layout(root)
    train, test = (layout["train"], layout["test"]) if layout["test"] is not None else \
        split_folder(layout["train"], seed)
    counts = np.bincount([k for _, k in train + test], minlength=len(layout["classes"]))
    in_test = np.bincount([k for _, k in test], minlength=len(layout["classes"]))
    small = [f"{layout['classes'][k]} ({counts[k]} image{'s' * int(counts[k] != 1)})"
             for k in range(len(counts)) if in_test[k] == 0]
    if small:
        _say_once(root, "small", f"too small to test, so no test image and no test score: "
                  f"{', '.join(small)}; add images to these classes")
    listing = hashlib.sha256(f"{CACHE_FORMAT} {image_size} {seed if layout['test'] is None else ''}"
                             .encode())
    for split, files in (("train", train), ("test", test), ("val", layout["val"] or [])):
        for path, k in files:
            st = path.stat()
            listing.update(f"{split} {path.relative_to(root).as_posix()} {k} {st.st_size} "
                           f"{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return layout, train, test, listing.hexdigest()[:20]


def read_image_folder(root: Path, image_size: int | None, seed: int, cache_dir: Path | None,
                      show_progress: bool = True, listing: tuple | None = None) -> dict:
    """An image folder (see folder_layout) as uint8 tensors: {'train_x', 'train_y', 'test_x',
    'test_y', 'classes', 'source'} (and 'val_x', 'val_y' from its val/ folder, if any), 'source'
    saying where the images came from (path, file counts, content hash, JPEG qualities). Decoded
    once: the tensors are cached in `cache_dir` under a key of every file's path, size and mtime
    (and image_size, seed), so a changed folder is decoded again; an unwritable cache only costs
    the decoding next time. `listing`: folder_listing's answer when the caller has it (a stat of
    every file: seconds for CIFAR-10's 60,000). Raises DatasetUnavailable."""
    root = Path(root).resolve()
    layout, train, test, key = listing or folder_listing(root, image_size, seed)
    cache = Path(cache_dir) / f"{root.name}-{key}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # noqa: BLE001 - a broken cache is only decoded again
            pass
    if not test:
        raise DatasetUnavailable(f"image folder {shown(root)} has too few images to split off a "
                                 f"test set")
    rule = ("train/, val/ and test/" if layout["val"] else "train/ and test/") if layout["test"] \
        is not None else f"seeded {FOLDER_TEST_FRACTION:.0%} of each class to test (seed {seed})"
    out = decode_splits(root, {"train": train, "test": test, "val": layout["val"]}, image_size,
                        show_progress, rule)
    out["classes"] = list(layout["classes"])
    if cache is not None:
        try:
            _write_atomically(cache, lambda f: torch.save(out, f))
        except OSError as err:
            print(f"note: could not cache the decoded images in {cache.parent} ({err.strerror}); "
                  f"they will be decoded again next time", flush=True)
    return out


def decode_splits(root: Path, splits: dict, image_size: int | None, show_progress: bool,
                  rule: str) -> dict:
    """{'train_x', 'train_y', 'test_x', 'test_y'} (and 'val_x', 'val_y' when splits['val'] lists
    files) decoded by decode_images from an image folder's {split: [(path, class index)]}, every
    split at the training images' size, and in colour when any split is; with 'source': the
    folder's path, file counts, how it was split (`rule`), a sha256 over the splits' hashes, the
    formats and image_size. Raises DatasetUnavailable."""
    names = [s for s in ("train", "test", "val") if splits.get(s)]
    print(f"decoding {sum(len(splits[s]) for s in names)} images of {shown(root)} (once; cached)",
          flush=True)
    got = {"train": decode_images(splits["train"], root, image_size, show_progress)}
    for s in names[1:]:
        got[s] = decode_images(splits[s], root, image_size, show_progress,
                               expect_side=got["train"]["x"].shape[-1])
    if len({d["x"].shape[1] for d in got.values()}) > 1:  # grey train, colour test or the reverse
        for d in got.values():
            d["x"] = d["x"].expand(-1, 3, -1, -1)
    out = {f"{s}_{t}": got[s][t].contiguous() if t == "x" else got[s][t] for s in names for t in "xy"}
    h = hashlib.sha256("".join(f"{got[s]['sha256']}\n" for s in names).encode()).hexdigest()
    out["source"] = {"kind": "image folder", "path": str(root),
                     "files": sum(len(splits[s]) for s in names),
                     **{f"{s}_files": len(splits[s]) for s in names}, "split": rule, "sha256": h,
                     "formats": sorted(set().union(*(d["formats"] for d in got.values()))),
                     "resized_to": image_size}
    return out


def image_folder_spec(path: str, hflip: bool = True) -> DatasetSpec:
    """The DatasetSpec of a learner's own image folder before it is read: named after the folder
    (a results folder's name: lower-case ASCII [a-z0-9_], accents dropped, a short hash of the
    original name added when letters were dropped, '_folder' added to a built-in dataset's name or
    one of the program's own folders; the original name stays the title); channels, size, classes and statistics are
    filled in by load_splits from the images. Augmented as CIFAR-10 is: translation by an eighth of
    the side, and horizontal flips unless hflip=False (--no-flip: digits, text)."""
    title = Path(path).resolve().name
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    name = "".join(c if c.isalnum() else "_" for c in ascii_title.lower()).strip("_") or "images"
    if ascii_title != title:  # letters were dropped: a stable suffix keeps two such names apart
        name = f"{name}_{_short_hash(title)}"
    name = f"{name}_folder" if name in DATASETS or name in RESERVED_FOLDERS else name
    return DatasetSpec(name, None, str(Path(path).resolve()), (), 0, 0, (), (), 0, hflip, (),
                       title=shown(title))


def _short_hash(text: str) -> str:
    """6 hex digits of text's sha1 (a name that is not UTF-8 hashed as its bytes)."""
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:6]


def stored_source(results_dir: Path, key: str) -> str | None:
    """The resolved path of the image folder whose records are in <results_dir>/cnn/<key>/ (its
    first readable record's data source), or None: no record, or none that says."""
    for path in sorted((Path(results_dir) / "cnn" / key).glob("*.pkl")):
        try:
            source = (load_result(path).get("data") or {}).get("source") or {}
        except ResultsFileError:
            continue
        if source.get("kind") == "image folder" and source.get("path"):
            return source["path"]
    return None


def folder_key(spec: DatasetSpec, results_dir: Path, taken: dict) -> DatasetSpec:
    """An image folder's spec under a results key of its own: the key of records already made
    from this very folder (their stored source path, compared with os.path.samefile); else its
    name's key (image_folder_spec) unless another folder that still exists holds it, here or in
    `taken` ({key: folder} of this command); else that key and '_' and 6 hex digits of the
    folder's resolved path, the parent folder's name added to its title. So two folders of one
    name (a/images, b/images; Photos, photos) are two datasets, in one command and across
    commands, and a folder keeps its key from run to run (a moved one keeps its name's key
    when its old place is gone)."""
    folder, base = Path(spec.folder), spec.name
    hashed = f"{base}_{_short_hash(str(folder))}"

    @functools.cache
    def holder(key):  # the folder whose records or request hold the key, if it still exists
        path = taken.get(key) or stored_source(results_dir, key)
        return path if path and Path(path).is_dir() else None

    def is_this(path):
        try:
            return path is not None and os.path.samefile(path, folder)
        except OSError:
            return False
    earlier = sorted(p.name for p in (Path(results_dir) / "cnn").glob(f"{base}_??????")
                     if p.is_dir())
    key = next((k for k in dict.fromkeys((base, hashed, *earlier)) if is_this(holder(k))), None)
    if key is None:
        key = base if holder(base) is None else hashed
    if key == base:
        return spec
    return dataclasses.replace(spec, name=key, title=f"{shown(folder.parent.name)}/{spec.title}")


def data_source(spec: DatasetSpec, root: str) -> str | None:
    """Which copy of a dataset load_splits reads: None for torchvision's files (on disk, or to be
    downloaded), else the image folder's path: a learner's folder, or a copy of a torchvision
    dataset under --data-dir (spec.image_folders) when torchvision's files are not there."""
    if spec.torchvision_class is None:
        return spec.folder
    if all((Path(root) / spec.folder / f).exists() for f in spec.files):
        return None
    return next((str(Path(root) / f) for f in spec.image_folders if (Path(root) / f).is_dir()), None)


def data_listing(spec: DatasetSpec, root: str, image_size: int | None, seed: int) -> tuple | None:
    """folder_listing of the image folder data_source picks, or None for torchvision's files.
    Raises DatasetUnavailable (see folder_layout)."""
    folder = data_source(spec, root)
    return None if folder is None else folder_listing(Path(folder).resolve(), image_size, seed)


def data_identity(spec: DatasetSpec, root: str, image_size: int | None, seed: int,
                  listing: tuple | None = None) -> str:
    """What a run's settings record of its data: 'torchvision', or 'image folder <key>' (see
    folder_listing), so a changed folder or another copy is a run of other settings."""
    listing = listing or data_listing(spec, root, image_size, seed)
    return "torchvision" if listing is None else f"image folder {listing[3]}"


def data_label(spec: DatasetSpec, source: dict | None) -> str:
    """How tables and plots name the data: 'CIFAR-10', 'CIFAR-10, JPEG q75 copy', 'flowers (image
    folder)'."""
    title = spec.title or spec.name
    if not source or source.get("kind") != "image folder":
        return title
    if spec.torchvision_class is None:
        return f"{title} (image folder)"
    formats = source.get("formats") or []
    return f"{title}, {formats[0]} copy" if len(formats) == 1 and formats[0].startswith("JPEG") \
        else f"{title}, image-folder copy"


# =============================================================================================
# TRAINING HELPERS (each process's batches, the divergence checks)
# =============================================================================================

class RunsFailed(RuntimeError):
    """Some runs of the grid ended as failed (diverged): their records are written, the exit status
    is 1."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf, or stayed at chance level (ln num_classes) after an epoch."""


# A run whose training loss is still at ln(num_classes) and whose validation accuracy is at chance
# after this many optimizer steps has diverged (or never started learning): it is marked failed.
DIVERGED_MIN_STEPS = 200


def check_divergence(epoch: int, steps_per_epoch: int, train_loss: float, val_acc: float,
                     num_classes: int) -> None:
    """Raise TrainingDiverged for a non-finite loss, or one still at chance level (ln num_classes,
    with validation accuracy at chance) after DIVERGED_MIN_STEPS optimizer steps."""
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"training loss became {train_loss} in epoch {epoch}")
    if (epoch * steps_per_epoch >= DIVERGED_MIN_STEPS and val_acc <= 1.5 / num_classes
            and train_loss > 0.95 * math.log(num_classes)):
        raise TrainingDiverged(f"loss stuck at chance level (ln {num_classes} = "
                               f"{math.log(num_classes):.3f}) after epoch {epoch}")


def process_batches(t: Trainee, data: Splits, desc: str):
    """This process's share of one epoch of fit: the training split shuffled by
    t.generators['shuffle'] (seeded alike on every process, so all agree on each global batch), cut
    into global batches of cfg['batch_size'] images (epoch_batches: the ragged last one dropped), of
    which each of the num_processes processes takes every num_processes-th image. Yields (uint8
    images n x C x H x W, int64 labels n) on the data's device; draws a progress bar named `desc`
    on the main process when t.show_progress."""
    from tqdm.auto import tqdm
    world, rank = t.accelerator.num_processes, t.accelerator.process_index
    steps, batch = epoch_batches(len(data.train_y), t.cfg["batch_size"])
    perm = torch.randperm(len(data.train_y), generator=t.generators["shuffle"]).to(data.train_y.device)
    for step in tqdm(range(steps), desc=desc, leave=False, dynamic_ncols=True,
                     disable=not (t.show_progress and t.accelerator.is_local_main_process)):
        idx = perm[step * batch:(step + 1) * batch][rank::world]
        yield data.train_x[idx], data.train_y[idx]


def check_finite(loss_sum: torch.Tensor, step: int, epoch: int, accelerator) -> None:
    """Raise TrainingDiverged when an epoch's running loss sum (nats) has become NaN or inf, checked
    after every 50th step (steps 49, 99, ...: one synchronisation per 50 steps) and summed over the
    processes, so that all of them stop together."""
    if step % 50 == 49 and not torch.isfinite(accelerator.reduce(loss_sum, "sum")):
        raise TrainingDiverged(f"training loss became non-finite in epoch {epoch}")


# =============================================================================================
# PRECISION (autocast by device: bf16, fp16 with loss scaling, or fp32)
# =============================================================================================

def cpu_bf16_support() -> str:
    """The CPU's native bf16 instructions as torch reports them: 'AMX', 'AVX-512 BF16', both
    joined by ' and ', or '' when it has neither (AVX2-only CPUs, most laptops)."""
    found = [name for name, probe in (("AVX-512 BF16", "_is_avx512_bf16_supported"),
                                      ("AMX", "_is_amx_tile_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return " and ".join(found)


def choose_precision(requested: str, on_cpu: bool) -> tuple:
    """The autocast precision for this process's device, and why: (precision, reason).

    requested: 'auto' | 'bf16' | 'fp16' | 'no' (fp32); anything but 'auto' is kept as asked, except
    fp16 on a CPU: ValueError, as fp16 autocast with loss scaling applies only on a CUDA GPU (the run
    would be fp32 while its record said fp16).
    'auto' follows the hardware, not torch.cuda.is_bf16_supported() (which also counts emulated
    bf16, so it says True on a T4):
      - a CPU with native bf16 (AVX-512 BF16 or AMX, as torch reports them: cpu_bf16_support):
        bf16; without it fp32 ('no'), since emulated bf16 trains 7-12x slower than fp32 there;
      - a CUDA GPU of compute capability >= 8.0 (A100, L4, RTX 30xx on): bf16, native there;
      - 7.0 <= capability < 8.0 (V100, T4, RTX 20xx): fp16 with loss scaling (tensor cores do fp16,
        bf16 is emulated);
      - below 7.0 (P100, K80): fp32, as there are no tensor cores for mixed precision to use.
    """
    if requested == "fp16" and on_cpu:
        raise ValueError("--precision fp16 applies only on a CUDA GPU (fp16 with loss scaling); on a "
                         "CPU use --precision bf16 or no (fp32)")
    if requested != "auto":
        return requested, "as asked (--precision)"
    if on_cpu:
        native = cpu_bf16_support()
        if native:
            return "bf16", f"CPU with native bf16 ({native})"
        return "no", "CPU without native bf16 (no AVX-512 BF16, no AMX): fp32, emulated bf16 is slower"
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"
    if major >= 8:
        return "bf16", f"{gpu} >= 8.0: native bf16"
    if major >= 7:
        return "fp16", f"{gpu} < 8.0: bf16 only emulated, fp16 with loss scaling"
    return "no", f"{gpu} < 7.0: no tensor cores, fp32"


def make_accelerator(device: str, precision: str):
    """One accelerate.Accelerator for this process: device placement, autocast and (fp16) loss
    scaling. device: 'auto' | 'cpu' | 'cuda'; precision: see choose_precision.
    Raises ValueError for --device cuda without a visible GPU.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    precision, _ = choose_precision(precision, on_cpu)
    AcceleratorState._reset_state(True)  # a fresh state: tests and notebooks may call main() twice
    return Accelerator(cpu=on_cpu, mixed_precision=precision)


# =============================================================================================
# COST AND SCORES (FLOPs, the test set, the --predict threshold, the record)
# =============================================================================================

def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                         transposed, _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """FLOPs of aten.convolution_backward: the input gradient and the weight gradient each cost
    what the forward convolution costs. torch's own formula leaves `groups` out of the weight
    gradient and so counts a depthwise convolution's (Xception's) C times over."""
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(model: nn.Module, shape: tuple, backward: bool = False, batch: int = 2) -> float:
    """FLOPs per image of one forward pass (or forward + backward, as one training step does) of
    `model` on images of `shape` (C, H, W), counted by torch.utils.flop_counter on a copy:
    convolutions and matmuls, 2 FLOPs per multiply-add (forward FLOPs / 2 =
    MACs); normalisation, activations and pooling are not counted. The images need no gradient, so
    the first layer's input gradient is not counted. Draws no random numbers."""
    from torch.utils.flop_counter import FlopCounterMode
    # On the meta device: shapes only, no arithmetic (Xception's first CPU pass would spend seconds
    # building oneDNN kernels) and no random draws; eval mode, as dropout changes no op count.
    m = copy.deepcopy(model).to("meta").float().eval()
    x = torch.zeros(batch, *shape, device="meta")
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = m(x)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops() / batch


# --predict calls an answer "low confidence" when its top softmax probability is below the 5% quantile
# of the validation images', or below the level above which validation answers were right 95% of the
# time (both chosen per trained run on validation data; see confidence_threshold).
OOD_VAL_QUANTILE = 0.05
CONFIDENT_ACCURACY = 0.95
# ... and an image is "unlike the training images" when its pixel spread or its pixel-to-pixel
# variation (image_statistics) falls outside the range of the middle 99% of validation images: a
# blank picture and noise are caught there, where a network's softmax can still be sure (MSP alone
# calls CIFAR-10 noise "frog" at 88%).
INPUT_RANGE_QUANTILES = (0.005, 0.995)


def score_test(model, data: Splits, spec: DatasetSpec, cfg: dict, accelerator,
               n_misclassified: int = 24) -> dict:
    """Score the (already restored) checkpoint on the test set.

    Returns loss (nats), accuracy, macro precision, recall and F1 (scikit-learn), the confusion
    matrix (int64 NumPy, true x predicted), per-class accuracy (the matrix's recall per true class),
    every test image's true and predicted label (int8, int16 past 127 classes; the true labels make
    paired tests between models possible from the records alone) and its softmax probability
    (float16), and the `n_misclassified` most confident mistakes with their uint8 images
    (k x C x H x W), so the report can show what the network gets wrong from the record alone.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    labels = list(range(len(spec.classes)))
    loss, accuracy, preds, confidence = evaluate(model, data.test_x, data.test_y, spec, accelerator,
                                                 cfg["eval_batch_size"])
    y_true, y_pred, conf = data.test_y.cpu().numpy(), preds.numpy(), confidence.numpy()
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    label_dtype = np.int8 if len(labels) <= 127 else np.int16
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:n_misclassified]
    return {"loss": loss, "accuracy": accuracy, "precision": float(precision),
            "recall": float(recall), "f1": float(f1), "n_images": int(len(y_true)),
            "confusion_matrix": matrix,
            "per_class_accuracy": matrix.diagonal() / np.maximum(matrix.sum(1), 1),
            "labels": y_true.astype(label_dtype), "predictions": y_pred.astype(label_dtype),
            "confidence": conf.astype(np.float16),
            "misclassified": {
                "index": worst.astype(np.int32),
                "image": data.test_x[torch.as_tensor(worst, device=data.test_x.device)].cpu().numpy(),
                "true": y_true[worst].astype(label_dtype), "predicted": y_pred[worst].astype(label_dtype),
                "confidence": conf[worst].astype(np.float32)}}


def confidence_threshold(model, data: Splits, spec: DatasetSpec, cfg: dict, accelerator) -> dict:
    """The low-confidence rule of --predict, chosen on validation images (never on test), on the
    maximum softmax probability of the chosen checkpoint (Hendrycks & Gimpel, "A Baseline for
    Detecting Misclassified and Out-of-Distribution Examples", 2017). Two levels, the rule uses the
    higher one:
    - typical: the OOD_VAL_QUANTILE quantile of the validation images' top probability (an image
      below it is less sure than 95% of them were);
    - reliable: the lowest top probability above which the validation answers were right at least
      CONFIDENT_ACCURACY of the time (selective classification; Geifman & El-Yaniv, 2017).
    With it, input_range: the INPUT_RANGE_QUANTILES of the validation images' image_statistics.
    Returns {"rule", "quantile", "target_accuracy", "typical", "reliable", "threshold" (in [0, 1]),
    "input_range": {statistic: [low, high]}, "n_images"}."""
    _, _, predicted, confidence = evaluate(model, data.val_x, data.val_y, spec, accelerator,
                                           cfg["eval_batch_size"])
    confidence = confidence.numpy().astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    right = (predicted.numpy() == data.val_y.cpu().numpy())[order]
    accuracy_above = np.cumsum(right) / np.arange(1, len(right) + 1)  # of the k surest answers
    ok = np.flatnonzero(accuracy_above >= CONFIDENT_ACCURACY)
    reliable = float(confidence[order][ok.max()]) if len(ok) else 1.0
    typical = float(np.quantile(confidence, OOD_VAL_QUANTILE))
    stats = image_statistics(data.val_x)
    input_range = {k: [float(q) for q in np.quantile(v, INPUT_RANGE_QUANTILES)] for k, v in stats.items()}
    return {"rule": "max softmax probability", "quantile": OOD_VAL_QUANTILE,
            "target_accuracy": CONFIDENT_ACCURACY, "typical": typical, "reliable": reliable,
            "threshold": max(typical, reliable), "input_range": input_range,
            "n_images": int(len(confidence))}


def image_statistics(x_uint8: torch.Tensor) -> dict:
    """Two plain statistics per image of N x C x H x W uint8 images, in grey levels (0-255), as
    NumPy arrays of length N: 'pixel spread' (the standard deviation of all its values: 0 for a
    blank image) and 'pixel-to-pixel variation' (the mean absolute difference between horizontal and
    vertical neighbours: about 85 for uniform noise, far less for photos and digits)."""
    x = x_uint8.float()
    spread = x.flatten(1).std(1)
    variation = ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
                 + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)) / 2
    return {"pixel spread": spread.cpu().numpy(), "pixel-to-pixel variation": variation.cpu().numpy()}


def make_record(model_name: str, spec: DatasetSpec, t: Trainee, progress: dict,
                failure: str | None) -> dict:
    """The result record of a trained (or failed) run, before test scoring: plain Python types and
    NumPy arrays only (see RESULTS), so it unpickles without torch."""
    history = progress["history"]
    train_time = float(sum(history["epoch_time_s"]))
    images_seen = len(history["epoch"]) * t.images_per_epoch
    return {
        "format": RESULTS_FORMAT, "model": model_name, "model_display_name": MODELS_REGISTRY[model_name][0],
        "dataset": spec.name, "status": "failed" if failure else "ok", "failure_reason": failure,
        "history": history, "best_epoch": progress["best_epoch"],
        "best_val_accuracy": (progress["best_val_accuracy"] if progress["best_state"] is not None
                              else None),
        "params": t.params, "macs_per_image": t.macs_per_image,
        "train_flops_per_image": t.train_flops_per_image,
        "train_flops": t.train_flops_per_image * images_seen, "train_time_s": train_time,
        "throughput_img_s": images_seen / train_time if history["epoch"] else None,
        "target_val_accuracy": TARGET_VAL_ACCURACY.get(spec.name),
        "time_to_target_s": progress["time_to_target"], "test": None, "classes": list(spec.classes),
        "still_improving": still_improving(history),  # the last epoch set the best validation accuracy
    }


# =============================================================================================
# CHECKPOINTS (resume inside a pair: a disconnect costs at most the epoch in progress)
# =============================================================================================

def _rng_states(accelerator, generators: dict) -> dict:
    """Every random state training draws from, one entry per process (gathered to all): the
    shuffle and augmentation generators, torch's global CPU generator (dropout) and CUDA's."""
    from accelerate.utils import gather_object
    mine = {"augment": generators["augment"].get_state(), "torch": torch.get_rng_state(),
            "cuda": (torch.cuda.get_rng_state(accelerator.device)
                     if accelerator.device.type == "cuda" else None)}
    return {"shuffle": generators["shuffle"].get_state(), "per_process": gather_object([mine])}


def save_checkpoint(t: Trainee, progress: dict) -> None:
    """Write the complete training state after an epoch to t.checkpoint (torch.save, atomically,
    main process only): the run's settings, model, optimizer, one-cycle schedule, fp16 loss
    scaler, every RNG state and `progress`. Every process must call it (the RNG states are
    gathered). Nothing happens when the run has no checkpoint (t.checkpoint None)."""
    if t.checkpoint is None:
        return
    accelerator = t.accelerator
    rng = _rng_states(accelerator, t.generators)
    if not accelerator.is_main_process:
        return
    state = {"format": CHECKPOINT_FORMAT, "settings": t.settings, "progress": progress, "rng": rng,
             "model": accelerator.unwrap_model(t.model).state_dict(),
             "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
             "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
    _write_atomically(t.checkpoint, lambda f: torch.save(state, f))


def read_checkpoint(path: Path, settings: dict | None) -> dict | None:
    """The checkpoint at `path` if there is one and it belongs to a run with these `settings`;
    None otherwise. An unreadable one is renamed to *.corrupt (kept, one line printed) and None
    returned, so the pair starts over instead of failing."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
            raise ValueError("not a checkpoint of this program")
    except Exception as err:  # noqa: BLE001 - truncated, garbage, or foreign
        if is_main_process():
            bad = path.with_name(path.name + ".corrupt")
            os.replace(path, bad)
            print(f"warning: {path} is unreadable ({type(err).__name__}); kept as {bad.name}, "
                  f"the pair starts from epoch 1", file=sys.stderr, flush=True)
        return None
    if state["settings"] != settings:
        if is_main_process():
            print(f"  {path.name} is of a run with other settings "
                  f"({settings_diff(state['settings'], settings)}): replaced, training starts at "
                  f"epoch 1", flush=True)
        return None
    return state


def restore_checkpoint(t: Trainee) -> dict | None:
    """Load the run's checkpoint (t.checkpoint, if it matches t.settings; see read_checkpoint) into
    its model, optimizer, schedule, loss scaler and RNGs of this process, print where training
    resumes, and return its progress; None (and nothing changed) when there is none. Raises
    ValueError when it was written by another number of processes."""
    state = read_checkpoint(t.checkpoint, t.settings) if t.checkpoint is not None else None
    if state is None:
        return None
    accelerator, generators, path = t.accelerator, t.generators, t.checkpoint
    accelerator.unwrap_model(t.model).load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    if accelerator.scaler is not None and state["scaler"] is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng["per_process"]) != accelerator.num_processes:
        raise ValueError(f"{path} was written by {len(rng['per_process'])} process(es), this run has "
                         f"{accelerator.num_processes}: launch it as before, or delete the checkpoint")
    mine = rng["per_process"][accelerator.process_index]
    generators["shuffle"].set_state(rng["shuffle"])
    generators["augment"].set_state(mine["augment"])
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], accelerator.device)
    done = len(state["progress"]["history"]["epoch"])
    accelerator.print(f"  resuming from the checkpoint after epoch {done} ({path})", flush=True)
    return state["progress"]


# =============================================================================================
# RESULTS (plain Python types and NumPy arrays only: pickle.load opens them without this file)
# =============================================================================================

RESULTS_FORMAT = "cnn_project/2"        # /2 added settings-keyed runs, weights and plain versions
READABLE_FORMATS = ("cnn_project/1", RESULTS_FORMAT)
CHECKPOINT_FORMAT = "cnn_project/checkpoint/1"
# The settings that define a run: a pair is skipped only when its record has exactly these.
SETTINGS_KEYS = ("model", "dataset", "epochs", "width", *RECIPE, "seed", "precision", "preset",
                 "subset", "data")
RUN_COLUMNS = ("dataset", "data", "model", "seed", "status", "params", "macs_per_image",
               "train_flops", "epochs", "width", "preset", "precision", "subset", "best_epoch",
               "best_val_accuracy", "still_improving", "test_accuracy", "test_precision",
               "test_recall", "test_f1", "test_loss", "test_ece", "train_time_s", "throughput_img_s",
               "time_to_target_s", "failure_reason")
SUMMARY_COLUMNS = ("dataset", "data", "model", "n_seeds", "seeds", "epochs", "width", "preset",
                   "precision", "params", "macs_per_image", "train_flops_mean",
                   "best_val_accuracy_mean", "test_accuracy_mean", "test_accuracy_std",
                   "test_accuracy_min", "test_accuracy_max", "test_f1_mean", "test_f1_std",
                   "train_time_s_mean", "throughput_img_s_mean", "timed_on", "still_improving", "verdict",
                   "difference", "ci_low", "ci_high", "p_max", "p_values", "test_ece_mean",
                   "test_ece_std", "corrupted_accuracy", "corrupted_verdicts")


class ResultsFileError(RuntimeError):
    """A results pickle is corrupt or was not written by this program."""


def result_path(results_dir: Path, dataset: str, model: str, seed: int = 0) -> Path:
    """Where one (dataset, model, seed) record lives: <results_dir>/cnn/<dataset>/<model>.pkl for
    seed 0 (the default, and every record of a single-seed run) and <model>.seed<k>.pkl for seed k.
    Its weights are beside it (.safetensors), and its checkpoint while it trains (.checkpoint.pt)."""
    name = model if seed == 0 else f"{model}.seed{seed}"
    return Path(results_dir) / "cnn" / dataset / f"{name}.pkl"


def weights_path(results_dir: Path, dataset: str, model: str, seed: int = 0) -> Path:
    """The validation-chosen weights of a finished run (safetensors; see save_weights)."""
    return result_path(results_dir, dataset, model, seed).with_suffix(".safetensors")


def checkpoint_path(results_dir: Path, dataset: str, model: str, seed: int = 0) -> Path:
    """The training state of an unfinished run, rewritten after every epoch."""
    return result_path(results_dir, dataset, model, seed).with_suffix(".checkpoint.pt")


def run_settings(model: str, dataset: str, epochs: int, width: float, cfg: dict, seed: int,
                 precision: str, preset: str, subset: int | None, data: str = "torchvision") -> dict:
    """The SETTINGS_KEYS of one run as a dict of plain values (compared with ==); `data` is the
    data's identity (data_identity)."""
    values = dict(cfg, model=model, dataset=dataset, epochs=epochs, width=float(width), seed=seed,
                  precision=precision, preset=preset, subset=subset, data=data)
    return {k: values[k] for k in SETTINGS_KEYS}


def settings_of(record: dict) -> dict:
    """The settings a record was trained with (missing ones, in older records, are None)."""
    return {k: record.get("config", {}).get(k) for k in SETTINGS_KEYS}


def settings_diff(old: dict, new: dict) -> str:
    """'epochs 3 -> 10, width 0.25 -> 1.0': the settings that differ, for one log line."""
    return ", ".join(f"{k} {old[k]} -> {new[k]}" for k in SETTINGS_KEYS if old[k] != new[k])


def _write_atomically(path: Path, write, binary: bool = True) -> None:
    """Call write(file) on a temp file beside `path`, then rename it over `path`: a kill leaves the
    old file or the new one, never half of one, and a failed write removes its temp file. A write
    the disk refuses (STORAGE_FAULTS) raises OSError naming `path`, whatever step failed."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
        with contextlib.suppress(OSError):  # a mount without permissions (Drive's FUSE) may refuse
            os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in STORAGE_FAULTS:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


# A write the disk refuses: errno -> what it means for the learner. NOT_WRITABLE: the folder refuses
# every write (another --results-dir, or its permissions, helps); the others: the disk is full.
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
STORAGE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EROFS: "the folder is read-only", errno.EACCES: "the folder is not writable",
                  errno.EPERM: "the folder is not writable"}


def storage_fault(err: BaseException, results_dir: Path | None = None) -> str | None:
    """The one line for a write the disk refused (no space, read-only, no permission): what could
    not be written, why, and what to do. None for any other error, and for a file outside
    `results_dir` when it is given (that error is not a results folder's)."""
    if not isinstance(err, OSError) or err.errno not in STORAGE_FAULTS:
        return None
    where = Path(err.filename) if err.filename else None
    if results_dir is not None and where is not None and not where.resolve().is_relative_to(
            Path(results_dir).resolve()):
        return None
    full = err.errno not in NOT_WRITABLE
    todo = ("free some space there, or choose another --results-dir" if full else
            "choose another --results-dir, or make that folder writable")
    return (f"could not write {where or 'the results folder'}: {STORAGE_FAULTS[err.errno]} "
            f"({err.strerror}). {todo[0].upper() + todo[1:]}, then run the same command again: "
            f"finished runs are kept and an interrupted one resumes after its last saved epoch.")


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
                               f"{err}).") from None
    if not isinstance(record, dict) or record.get("format") not in READABLE_FORMATS:
        raise ResultsFileError(f"{path} is not a {RESULTS_FORMAT} results record.")
    return record


def save_weights(path: Path, state: dict, record: dict) -> None:
    """Write a state_dict with safetensors, atomically; the metadata says how to rebuild the model
    (model, dataset, width, settings as JSON), so --predict needs nothing else."""
    import json
    from safetensors.torch import save
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"format": "cnn_project/weights/1", "model": record["model"], "dataset": record["dataset"],
            "width": repr(record["config"]["width"]), "settings": json.dumps(settings_of(record)),
            "best_epoch": str(record["best_epoch"])}
    data = save(tensors, metadata=meta)
    _write_atomically(path, lambda f: f.write(data))


def supersede(results_dir: Path, dataset: str, model: str, seed: int = 0) -> Path | None:
    """Move a run's old record (and its weights) into <dataset>/superseded/, named by when it
    finished, so a run with other settings replaces it without losing it. Returns the new path of
    the record, or None if there was none."""
    old = result_path(results_dir, dataset, model, seed)
    if not old.exists():
        return None
    record = load_result(old)
    stamp = record.get("finished_utc") or time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime(old.stat().st_mtime))
    folder = old.parent / "superseded"
    folder.mkdir(exist_ok=True)
    kept = folder / f"{old.stem}-{stamp}.pkl"
    weights = weights_path(results_dir, dataset, model, seed)
    if weights.exists():  # the weights first: a kill between the two moves leaves both findable
        os.replace(weights, kept.with_suffix(".safetensors"))
    os.replace(old, kept)
    return kept


def set_aside(path: Path, err: Exception) -> Path:
    """Move an unreadable record (and its weights) into <dataset>/unreadable/, named by when it was
    found, print one line saying so, and return its new path: a stale result, not a fatal error,
    so the run trains again and every other record still reports. Nothing is deleted."""
    folder = path.parent / "unreadable"
    folder.mkdir(exist_ok=True)
    kept = folder / f"{path.stem}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.pkl"
    weights = path.with_suffix(".safetensors")
    if weights.exists():
        os.replace(weights, kept.with_suffix(".safetensors"))
    os.replace(path, kept)
    print(f"warning: {err} It is kept as {kept}; that run counts as not trained and trains again.",
          file=sys.stderr, flush=True)
    return kept


def load_or_set_aside(path: Path) -> dict | None:
    """load_result, or None after set_aside when the record cannot be read (main process only;
    other processes leave the file to it and treat the run as missing)."""
    try:
        return load_result(path)
    except ResultsFileError as err:
        if is_main_process():
            try:
                set_aside(path, err)
            except OSError as fault:  # a read-only folder: report the others, move nothing
                if not storage_fault(fault):
                    raise
                print(f"warning: {err} It could not be moved aside ({fault.strerror}): left as it "
                      f"is and skipped.", file=sys.stderr, flush=True)
        return None


def record_seeds(folder: Path, model: str) -> list:
    """The seeds of a model's records in one dataset folder (<model>.pkl is seed 0), ascending."""
    seeds = [0] if (folder / f"{model}.pkl").exists() else []
    for path in folder.glob(f"{model}.seed*.pkl"):
        suffix = path.name[len(model) + len(".seed"):-len(".pkl")]
        if suffix.isdigit():
            seeds.append(int(suffix))
    return sorted(seeds)


def collect_runs(results_dir: Path) -> dict:
    """All records under results_dir/cnn as {dataset: {model: {seed: record}}}: the built-in
    datasets first, then image folders by name; models in registry order, seeds ascending."""
    found, folder = {}, Path(results_dir) / "cnn"
    others = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in DATASETS
                    and p.name not in RESERVED_FOLDERS) if folder.is_dir() else []
    for dataset in (*DATASETS, *others):
        for model in MODELS_REGISTRY:
            for seed in record_seeds(folder / dataset, model):
                record = load_or_set_aside(result_path(results_dir, dataset, model, seed))
                if record is not None:
                    found.setdefault(dataset, {}).setdefault(model, {})[seed] = record
    return found


def collect_results(results_dir: Path) -> dict:
    """One record per pair, {dataset: {model: record}}: each pair's lowest seed (see collect_runs
    for every seed)."""
    return {d: {m: seeds[min(seeds)] for m, seeds in by_model.items()}
            for d, by_model in collect_runs(results_dir).items()}


def run_rows(runs: dict) -> list:
    """One flat dict per run (dataset, model, seed) with the RUN_COLUMNS, plus 'model_key'."""
    rows = []
    for dataset, by_model in runs.items():
        for model, by_seed in by_model.items():
            for seed, r in by_seed.items():
                test, cfg = r["test"] or {}, r.get("config", {})
                rows.append({
                    "dataset": dataset, "data": record_label(r), "model": r["model_display_name"],
                    "model_key": model, "seed": cfg.get("seed", seed), "status": r["status"],
                    "params": r["params"], "macs_per_image": r.get("macs_per_image"),
                    "train_flops": r.get("train_flops"), "epochs": len(r["history"]["epoch"]),
                    **{k: cfg.get(k) for k in ("width", "preset", "precision", "subset")},
                    "best_epoch": r["best_epoch"], "best_val_accuracy": r["best_val_accuracy"],
                    "still_improving": still_improving(r["history"]),
                    **{f"test_{k}": test.get(k) for k in ("accuracy", "precision", "recall", "f1", "loss")},
                    **{k: r[k] for k in ("train_time_s", "throughput_img_s", "time_to_target_s",
                                         "failure_reason")}})
    return rows


def pair_rows(runs: dict, summary: dict) -> list:
    """One flat dict per (dataset, model) with the SUMMARY_COLUMNS (spread over seeds, verdict
    against the best), plus 'model_key' and 'best' (True for the validation-chosen model)."""
    rows = []
    for dataset, by_model in runs.items():
        for model, by_seed in by_model.items():
            first = by_seed[min(by_seed)]
            cfg, pair = first.get("config", {}), summary[dataset]["pairs"][model]
            row = {**dict.fromkeys(SUMMARY_COLUMNS), **pair}
            row.update(dataset=dataset, data=record_label(first), model=first["model_display_name"],
                       model_key=model, best=summary[dataset]["best"] == model,
                       seeds=" ".join(map(str, pair["seeds"])),
                       epochs=" ".join(map(str, pair["epochs"])),
                       p_values=" ".join(f"{p:.3g}" for p in pair.get("p_values") or []),
                       params=first["params"], macs_per_image=first.get("macs_per_image"),
                       **{k: cfg.get(k) for k in ("width", "preset", "precision")})
            rows.append(row)
    return rows


def write_summaries(runs: dict, summary: dict, results_dir: Path) -> None:
    """The combined pickle (cnn_results.pkl: every record, the spread and verdicts, the best per
    dataset) and two CSV tables: cnn_summary.csv (a row per pair) and cnn_runs.csv (a row per run);
    with what --inspect kept (merge_inspection: ECE, corrupted accuracies) also cnn_robustness.csv."""
    results_dir = Path(results_dir)
    robust = merge_inspection(results_dir, runs, summary)
    save_pickle({"format": RESULTS_FORMAT, "runs": runs,
                 "results": {d: {m: seeds[min(seeds)] for m, seeds in by_model.items()}
                             for d, by_model in runs.items()},
                 "summary": summary, "verdict_rule": VERDICT_RULE,
                 "best_by_validation": {d: v["best"] for d, v in summary.items() if v["best"]}},
                results_dir / "cnn_results.pkl")
    save_csv([{k: row[k] for k in SUMMARY_COLUMNS} for row in pair_rows(runs, summary)],
             SUMMARY_COLUMNS, results_dir / "cnn_summary.csv")
    save_csv([{**{k: row.get(k) for k in RUN_COLUMNS}, "test_ece": summary[row["dataset"]]["pairs"][
        row["model_key"]]["test_ece"].get(row["seed"])} for row in run_rows(runs)], RUN_COLUMNS,
             results_dir / "cnn_runs.csv")
    if robust:
        save_csv(robust, ROBUSTNESS_COLUMNS, results_dir / "cnn_robustness.csv")


# Runs that share a results folder: a pair trains only under its lock (<model>.lock beside its
# record), and a temp file is removed only by a run holding the lock of what it belongs to.

@contextlib.contextmanager
def file_lock(path: Path, wait: bool = False):
    """Hold an exclusive lock (fcntl.flock) on the file `path` for the with-block. Yields None when
    this process holds it, else the pid that the live process holding it wrote there ('unknown'
    before it has); with wait=True it waits for the lock instead. The kernel drops a lock when its
    process ends, even by SIGKILL. The file is deleted on leaving the block, while still held, so
    none is left behind. Where there are no locks (Windows, a file system without them) it yields
    None, holding nothing. Raises OSError when the file cannot be created (a read-only folder)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f, holder = _take_lock(fcntl, path, wait)
    if f is None:
        yield holder
        return
    try:
        yield None
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while held: a process that opened it meanwhile sees it gone and retries
        f.close()


def _take_lock(fcntl, path: Path, wait: bool) -> tuple:
    """(the open lock file, None) once this process holds it (or the file system has no locks),
    (None, pid of the holder) when another live process holds it."""
    for attempt in range(10):
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            return None, holder
        except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP): go on unlocked
            return f, None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same or attempt == 9:  # (a mount whose inode numbers change: take it as held)
            with contextlib.suppress(OSError):  # the pid only names the holder; a full disk may refuse it
                os.ftruncate(f.fileno(), 0)
                os.write(f.fileno(), f"{os.getpid()}\n".encode())
            return f, None
        f.close()  # its holder deleted it between our open and our lock: lock the new file


def pair_of(name: str) -> str | None:
    """The run a temp or lock file of a dataset folder belongs to ('lenet5', 'vgg.seed2'), from its
    name ('lenet5.pklx1y2z3w4.tmp', 'vgg.seed2.checkpoint.pt9q8r7s6t.tmp', 'vgg.seed2.lock'); None
    for any other file."""
    if name.endswith(".lock"):
        return name[:-len(".lock")]
    for kind in (".checkpoint.pt", ".safetensors", ".pkl") if name.endswith(".tmp") else ():
        stem, found, rest = name.partition(kind)
        if found and "." not in rest[:-len(".tmp")]:
            return stem
    return None


def remove_temp_files(paths: list, log) -> None:
    """Delete temp files that a stopped run left half-written (their owner's lock is held by this
    run), and say so in one line."""
    gone = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            gone += 1
    if gone:
        log(f"removed {_count(gone, 'temp file')} left half-written by a stopped run in "
            f"{paths[0].parent}", flush=True)


def tidy_dataset_folder(folder: Path, log) -> None:
    """Remove the temp and lock files of every run in a dataset folder that no live run holds: what
    a stopped run left. A run another live process is training keeps its files. Best effort: a
    folder that cannot be written (read-only) is left as it is."""
    leftovers = [*Path(folder).glob("*.tmp"), *Path(folder).glob("*.lock")]
    for pair in sorted({pair_of(p.name) for p in leftovers} - {None}):
        with contextlib.suppress(OSError), file_lock(Path(folder) / f"{pair}.lock") as holder:
            if holder is None:
                remove_temp_files([p for p in leftovers if p.suffix == ".tmp" and
                                   pair_of(p.name) == pair], log)


# =============================================================================================
# COMPARISON (spread over seeds, paired tests against the best; from the pickles alone)
# =============================================================================================

# A model is "worse" (or "better on test") than the dataset's validation-chosen best only when the
# exact McNemar test gives p < ALPHA for every seed both trained with, AND the paired bootstrap 95%
# interval of the accuracy difference excludes 0; otherwise it is tied with the best within noise.
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 2000   # paired bootstrap over test images (scipy.stats.bootstrap, percentile)
VERDICT_RULE = (f"each model against the dataset's best on validation (mean over seeds), on the same "
                f"test images: exact McNemar test per seed (each seed's run against the best's run "
                f"of the same seed) and a paired bootstrap 95% interval of the accuracy difference "
                f"(mean over seeds, {BOOTSTRAP_RESAMPLES} resamples of the test images); 'worse' or "
                f"'better on test' needs p < {ALPHA} in every seed and an interval without 0, "
                f"anything else is 'tied with the best within noise'")


def still_improving(history: dict) -> bool:
    """True when a run's last epoch set its best validation accuracy: it was still improving when
    its budget ran out, so more epochs could change the ranking."""
    val = history["val_accuracy"]
    return len(val) >= 2 and val[-1] > max(val[:-1])


def correct_on_test(record: dict) -> np.ndarray | None:
    """Boolean per test image: was this run right? None for a failed run or a record without the
    test labels (written before they were stored)."""
    test = record.get("test") or {}
    if "labels" not in test:
        return None
    return test["predictions"].astype(np.int64) == test["labels"].astype(np.int64)


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact McNemar test of two classifiers scored on the same N images (boolean arrays of length
    N): a two-sided binomial test (scipy.stats.binomtest, p = 1/2) on the images exactly one of them
    got right (McNemar, 1947). Returns {"only_a", "only_b": counts, "p_value"}; p = 1.0 when they
    never disagree. Raises ValueError when the arrays differ in length."""
    from scipy.stats import binomtest
    if a_correct.shape != b_correct.shape:
        raise ValueError(f"paired test on {a_correct.shape} and {b_correct.shape} images")
    only_a, only_b = int(np.sum(a_correct & ~b_correct)), int(np.sum(~a_correct & b_correct))
    p = 1.0 if only_a + only_b == 0 else binomtest(only_a, only_a + only_b, 0.5).pvalue
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p)}


def paired_bootstrap_ci(differences: np.ndarray, seed: int = 0) -> tuple:
    """95% percentile interval of the mean of per-image differences (model right minus best right,
    in [-1, 1]) over BOOTSTRAP_RESAMPLES resamples of the images (scipy.stats.bootstrap; Efron &
    Tibshirani, 1993). Returns (low, high) as fractions of accuracy."""
    from scipy.stats import bootstrap
    differences = np.asarray(differences, dtype=np.float64)
    if np.all(differences == differences[0]):  # no spread: every resample has the same mean
        return float(differences[0]), float(differences[0])
    ci = bootstrap((differences,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, confidence_level=0.95,
                   method="percentile", batch=250, random_state=np.random.default_rng(seed))
    return float(ci.confidence_interval.low), float(ci.confidence_interval.high)


def _mean_std(values) -> tuple:
    """(mean, sample standard deviation) of a list of numbers; None where undefined."""
    values = np.asarray(values, dtype=np.float64)
    return (float(values.mean()) if len(values) else None,
            float(values.std(ddof=1)) if len(values) > 1 else None)


def pair_spread(by_seed: dict) -> dict:
    """One pair's runs {seed: record} summarised over seeds: the seeds, epochs, the mean and sample
    standard deviation (None for one seed) of test accuracy, macro precision, recall and F1, the
    min and max test accuracy, the means of validation accuracy, training time and throughput, and
    how many runs were still improving at their last epoch (fractions, seconds, images/s). Time
    and throughput are averaged over the runs on the lowest seed's hardware only ('timed_on')."""
    ok = {s: r for s, r in by_seed.items() if r["status"] == "ok" and r.get("test")}
    out = {"seeds": sorted(ok), "n_seeds": len(ok), "failed_seeds": sorted(set(by_seed) - set(ok)),
           "epochs": sorted({len(r["history"]["epoch"]) for r in by_seed.values()}),
           "still_improving": sum(still_improving(r["history"]) for r in ok.values())}
    for metric in ("accuracy", "precision", "recall", "f1"):
        out[f"test_{metric}_mean"], out[f"test_{metric}_std"] = _mean_std(
            [r["test"][metric] for r in ok.values()])
    accuracy = [r["test"]["accuracy"] for r in ok.values()]
    out["test_accuracy_min"] = min(accuracy) if ok else None
    out["test_accuracy_max"] = max(accuracy) if ok else None
    for key in ("best_val_accuracy", "train_flops"):
        out[f"{key}_mean"] = _mean_std([r[key] for r in ok.values() if r.get(key) is not None])[0]
    # Seconds only compare on one machine: time and throughput are the means over the runs made on
    # the hardware of the pair's lowest seed (all of them, when every seed ran on one machine).
    out["timed_on"] = hardware(ok[min(ok)]) if ok else None
    timed = [r for r in ok.values() if hardware(r) == out["timed_on"]]
    for key in ("train_time_s", "throughput_img_s"):
        out[f"{key}_mean"] = _mean_std([r[key] for r in timed if r.get(key) is not None])[0]
    return out


def hardware(record: dict) -> str:
    """What a run trained on, as tables name it: the GPU's name (from its versions), or 'CPU'."""
    on_gpu = str(record.get("config", {}).get("device", "cpu")).startswith("cuda")
    return (record.get("versions", {}).get("gpu") or "GPU") if on_gpu else "CPU"


def compare_with_best(model_runs: dict, best_runs: dict) -> dict:
    """A model's runs {seed: record} against the best model's on the same test images: McNemar per
    common seed, the paired bootstrap interval of the mean accuracy difference, and the verdict
    (VERDICT_RULE). Differences are model minus best, in accuracy points (fractions)."""
    pairs = {s: (correct_on_test(model_runs[s]), correct_on_test(best_runs[s]))
             for s in sorted(model_runs) if s in best_runs}
    seeds = [s for s, (x, y) in pairs.items() if x is not None and y is not None]
    if not seeds:
        return {"verdict": "not compared (no common seed with per-image test results)",
                "seeds": [], "p_values": [], "difference": None, "ci_low": None, "ci_high": None}
    a, b = [pairs[s][0] for s in seeds], [pairs[s][1] for s in seeds]
    tests = [mcnemar_exact(x, y) for x, y in zip(a, b)]
    same_images = all(np.array_equal(model_runs[s]["test"]["labels"], model_runs[seeds[0]]["test"]["labels"])
                      and len(x) == len(a[0]) for s, x in zip(seeds, a))
    per_image = (np.mean([x.astype(float) - y for x, y in zip(a, b)], axis=0) if same_images
                 else np.concatenate([x.astype(float) - y for x, y in zip(a, b)]))
    low, high = paired_bootstrap_ci(per_image)
    p_max = max(t["p_value"] for t in tests)
    verdict = ("worse, p < 0.05" if p_max < ALPHA and high < 0 else
               "better on test, p < 0.05" if p_max < ALPHA and low > 0 else
               "tied with the best within noise")
    return {"verdict": verdict, "seeds": seeds, "p_values": [t["p_value"] for t in tests],
            "p_max": p_max, "mcnemar": tests, "difference": float(per_image.mean()),
            "ci_low": low, "ci_high": high}


def best_models(runs: dict) -> dict:
    """{dataset: model} with the highest mean validation accuracy over its finished seeds (the
    test set is not used). `runs` is collect_runs()'s {dataset: {model: {seed: record}}}."""
    best = {}
    for dataset, by_model in runs.items():
        model = _best_of({m: pair_spread(seeds) for m, seeds in by_model.items()})
        if model is not None:
            best[dataset] = model
    return best


def ranked_by_validation(spreads: dict) -> list:
    """The models of {model: pair_spread} with a finished run, highest mean validation accuracy
    first (ties in the dict's order)."""
    val = {m: p["best_val_accuracy_mean"] for m, p in spreads.items()
           if p["best_val_accuracy_mean"] is not None}
    return sorted(val, key=lambda m: -val[m])


def _best_of(spreads: dict) -> str | None:
    """The model whose pair_spread has the highest mean validation accuracy (None: none finished)."""
    ranked = ranked_by_validation(spreads)
    return ranked[0] if ranked else None


def summarize(runs: dict) -> dict:
    """{dataset: {"best": model, "pairs": {model: pair_spread + compare_with_best}}}: the numbers
    behind the table, the CSV and the plots (runs: {dataset: {model: {seed: record}}})."""
    out = {}
    for dataset, by_model in runs.items():
        pairs = {model: pair_spread(by_seed) for model, by_seed in by_model.items()}
        best = _best_of(pairs)  # the spreads are computed once, for the choice and the table
        for model, by_seed in by_model.items():
            if model == best:
                pairs[model]["verdict"] = "best on validation"
            elif best is not None and pairs[model]["n_seeds"]:
                pairs[model].update(compare_with_best(by_seed, by_model[best]))
            else:
                pairs[model]["verdict"] = "failed" if not pairs[model]["n_seeds"] else "no best to compare"
        out[dataset] = {"best": best, "pairs": pairs}
    return out


# =============================================================================================
# REPORT (table and plots, from the pickles alone)
# =============================================================================================

def _fmt(v, pattern="{:.2%}"):
    """Format a number for the table; None (not measured / not reached) prints as '-'."""
    return "-" if v is None else pattern.format(v)


def spec_of(record: dict) -> DatasetSpec:
    """The DatasetSpec a record was trained with (an image folder's is stored in the record;
    records from before image folders are of a built-in dataset)."""
    stored = (record.get("data") or {}).get("spec")
    if stored:
        return DatasetSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
    return DATASETS[record["dataset"]]


def record_label(record: dict) -> str:
    """How one record names its data ('CIFAR-10, JPEG q75 copy'; older records: the title)."""
    return (record.get("data") or {}).get("label") or spec_of(record).title or record["dataset"]


def records_of(by_model: dict) -> list:
    """Every record of one dataset's runs {model: {seed: record}}, in model then seed order."""
    return [r for by_seed in by_model.values() for r in by_seed.values()]


def data_labels(runs: dict) -> dict:
    """{dataset: how its records name their data ('CIFAR-10, JPEG q75 copy')}; the labels of a
    dataset's records joined when they differ."""
    return {dataset: " / ".join(dict.fromkeys(record_label(r) for r in records_of(by_model)))
            for dataset, by_model in runs.items()}


def budget_note(by_model: dict) -> str:
    """The budget one dataset's runs {model: {seed: record}} were trained under, for the table and
    the plots: '10 epochs for every model', or 'epochs per model (3-10), before the equal-epochs
    rule' for records from before BUDGET_RULE."""
    records = records_of(by_model)
    epochs = sorted({len(r["history"]["epoch"]) for r in records})
    span = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
    if any(r.get("config", {}).get("budget_rule") != BUDGET_RULE for r in records):
        return f"epochs per model ({span}), before the equal-epochs rule"
    return f"{_count(epochs[0], 'epoch')} for every model" if len(epochs) == 1 else \
        f"{span} epochs: runs of other settings mixed, or a failed run"


def mixed_settings(runs: dict) -> dict:
    """{dataset: 'preset (cpu, gpu), precision (bf16, no)'} for the settings, beyond each model's
    own epochs and width and each run's seed, in which a dataset's records differ, and the hardware
    when they ran on more than one ('hardware (CPU: seed 0; NVIDIA H200: seeds 1, 2)'); datasets
    whose records agree are left out."""
    own = ("model", "dataset", "epochs", "width", "data", "seed")
    shared = [k for k in SETTINGS_KEYS if k not in own]
    notes = {}
    for dataset, by_model in runs.items():
        values = {k: sorted({repr(settings_of(r)[k]) for r in records_of(by_model)}) for k in shared}
        differ = [f"{k} ({', '.join(v)})" for k, v in values.items() if len(v) > 1]
        seeds_on = {}
        for r in records_of(by_model):
            seeds_on.setdefault(hardware(r), set()).add(r.get("config", {}).get("seed", 0))
        if len(seeds_on) > 1:
            differ.append("hardware (" + "; ".join(
                f"{hw}: seed{'s' * (len(seeds) > 1)} {', '.join(map(str, sorted(seeds)))}"
                for hw, seeds in sorted(seeds_on.items(), key=lambda kv: min(kv[1]))) + ")")
        if differ:
            notes[dataset] = ", ".join(differ)
    return notes


def _pm(mean, std, pattern="{:.2%}") -> str:
    """'82.23% ± 0.31' (std in points), or '82.23%' for a single seed; '-' when not measured."""
    if mean is None:
        return "-"
    return pattern.format(mean) + ("" if std is None else f" ± {100 * std:.2f}")


def tied_group(summary_of_dataset: dict) -> list:
    """The best model and every model tied with it within noise, in table order."""
    return [m for m, p in summary_of_dataset["pairs"].items()
            if p["verdict"] in ("best on validation", "tied with the best within noise")]


def conclusion(dataset_label: str, summary_of_dataset: dict, names: dict) -> list:
    """The lines that say what one dataset's runs can and cannot tell: the best on validation, the
    models tied with it, the separable ones, and whether runs were still improving."""
    pairs, best = summary_of_dataset["pairs"], summary_of_dataset["best"]
    if best is None:
        return [f"{dataset_label}: no finished run"]
    b = pairs[best]
    tied = [names[m] for m in tied_group(summary_of_dataset) if m != best]
    lines = [f"{dataset_label}: best on validation {names[best]} (val {b['best_val_accuracy_mean']:.2%}, "
             f"test {_pm(b['test_accuracy_mean'], b['test_accuracy_std'])} over "
             f"{_count(b['n_seeds'], 'seed')})"]
    if tied:
        lines.append(f"    tied with it within noise: {', '.join(tied)}: the test set does not "
                     f"separate these, so no single one of them is the winner")
    for verdict in ("worse, p < 0.05", "better on test, p < 0.05"):
        found = [names[m] for m, p in pairs.items() if p["verdict"] == verdict]
        if found:
            lines.append(f"    {verdict.split(',')[0]} than it (p < {ALPHA} in every seed): {', '.join(found)}")
    runs = sum(p["n_seeds"] for p in pairs.values())
    if max(p["n_seeds"] for p in pairs.values()) == 1:
        lines.append("    one seed per model: how far another seed would move these numbers is not "
                     "measured here (train more with --seeds)")
    rising = sum(p["still_improving"] for p in pairs.values())
    if rising:
        lines.append(f"    still improving: {rising} of {runs} runs set their best validation accuracy "
                     f"in their last epoch; this ranking holds at this budget and could change with "
                     f"more training")
    return lines


def print_table(runs: dict, summary: dict) -> None:
    """Print the comparison table (accuracy over seeds beside cost, the verdict against the best),
    what each dataset's runs can tell, and the best model's weakest classes."""
    labels = data_labels(runs)
    header = (f"{'dataset':<14}{'model':<14}{'params':>11}{'MMACs':>7}{'ep':>4}{'width':>6}"
              f"{'seeds':>6}{'val acc':>9}{'test acc (± std)':>18}{'min-max':>16}{'F1':>8}"
              f"{'train s':>9}{'img/s':>8}  verdict against the best (largest p)")
    print("\none recipe for every model; data and budget per dataset:")
    for dataset, by_model in runs.items():
        print(f"  {dataset} = {labels[dataset]}: {budget_note(by_model)}")
    print(header + "\n" + "-" * len(header))
    rows = pair_rows(runs, summary)
    for row in rows:
        lead = (f"{row['dataset']:<14}{row['model']:<14}{row['params']:>11,}"
                f"{_fmt(row['macs_per_image'] and row['macs_per_image'] / 1e6, '{:.1f}'):>7}"
                f"{row['epochs']:>4}{_fmt(row['width'], '{:g}'):>6}{row['n_seeds']:>6}")
        if not row["n_seeds"]:
            print(f"{lead}  FAILED (every seed)")
            continue
        span = f"{row['test_accuracy_min']:.2%}-{row['test_accuracy_max']:.2%}"
        p = "" if row["p_max"] is None else f" (p {row['p_max']:.2g})"
        print(f"{lead}{_fmt(row['best_val_accuracy_mean']):>9}"
              f"{_pm(row['test_accuracy_mean'], row['test_accuracy_std']):>18}{span:>16}"
              f"{_fmt(row['test_f1_mean'], '{:.4f}'):>8}{row['train_time_s_mean']:>9.0f}"
              f"{_fmt(row['throughput_img_s_mean'], '{:.0f}'):>8}  "
              f"{'* ' if row['best'] else ''}{row['verdict']}{p}")
    print("\nmeans over seeds; ± is the sample standard deviation over seeds, in points. * best on "
          "validation (mean over seeds); its test figures are reported, not used to choose.\n"
          f"verdicts: {VERDICT_RULE}.\nMMACs: forward multiply-adds per image, in millions")
    for dataset, note in mixed_settings(runs).items():
        print(f"  note: the {dataset} runs were trained with different {note}: compare with care")
    timed_on = sorted({row["timed_on"] for row in rows if row["timed_on"]})
    print(f"train s, img/s: mean over the runs on the hardware of each model's lowest seed "
          f"({', '.join(timed_on)}); seconds from different machines are never averaged")
    names = {m: next(iter(by_seed.values()))["model_display_name"]
             for by_model in runs.values() for m, by_seed in by_model.items()}
    for dataset, by_model in runs.items():
        print("\n".join(conclusion(labels[dataset], summary[dataset], names)))
        best = summary[dataset]["best"]
        if best is None:
            continue
        r = by_model[best][min(summary[dataset]["pairs"][best]["seeds"])]
        per_class = r["test"].get("per_class_accuracy")
        if per_class is not None:
            worst = np.argsort(per_class, kind="stable")[:3]
            print(f"    weakest classes of {names[best]} (seed {r['config'].get('seed', 0)}): "
                  + ", ".join(f"{r['classes'][i]}: {per_class[i]:.1%}" for i in worst))


# The compact table's words for each verdict of summarize(); the full table prints the verdicts as
# they are.
VERDICT_WORDS = {"best on validation": "best on validation",
                 "tied with the best within noise": "tied with the best",
                 "worse, p < 0.05": "below the best", "better on test, p < 0.05": "above the best",
                 "failed": "failed (every seed)"}
WIDE = 100  # the compact table and the lines around it fit in this many characters


def _say(text: str, indent: str = "") -> None:
    """Print text wrapped at WIDE characters, continuation lines indented two more spaces."""
    print(textwrap.fill(text, WIDE, initial_indent=indent, subsequent_indent=indent + "  ",
                        break_on_hyphens=False, break_long_words=False))


def compact_conclusion(summary_of_dataset: dict, names: dict, by_model: dict) -> list:
    """A dataset's short conclusion for the compact table: the tied group in one sentence, whether
    the runs were still improving, the best model's weakest classes (seed: its lowest)."""
    pairs, best = summary_of_dataset["pairs"], summary_of_dataset["best"]
    if best is None:
        return ["no finished run"]
    tied = [m for m in tied_group(summary_of_dataset) if m != best]
    lines = [f"{names[best]} is best on validation" + (
        f"; {', '.join(names[m] for m in tied)} {'is' if len(tied) == 1 else 'are'} tied with it: "
        f"the test set does not separate them" if tied else "") + "."]
    runs = sum(p["n_seeds"] for p in pairs.values())
    rising = sum(p["still_improving"] for p in pairs.values())
    if max(p["n_seeds"] for p in pairs.values()) == 1:
        lines.append("One seed per model: train with --seeds 3 to see how much another seed moves "
                     "these numbers.")
    if rising:
        lines.append(f"{rising} of {_count(runs, 'run')} still improved in {'its' if runs == 1 else 'their'} "
                     f"last epoch: more epochs could change {'this result' if len(pairs) == 1 else 'this ranking'}.")
    r = by_model[best][min(pairs[best]["seeds"])]
    per_class = r["test"].get("per_class_accuracy")
    if per_class is not None:
        worst = np.argsort(per_class, kind="stable")[:3]
        lines.append(f"Weakest classes of {names[best]}: "
                     + ", ".join(f"{r['classes'][i]} ({per_class[i]:.1%})" for i in worst) + ".")
    return lines


def print_compact_table(runs: dict, summary: dict) -> None:
    """Print, per dataset, a table at most WIDE characters wide (model, test accuracy mean ± standard
    deviation over seeds, the verdict in words, parameters, mean training time per run) and its
    short conclusion; print_table has the full statistics."""
    labels, rows = data_labels(runs), pair_rows(runs, summary)
    names = {m: next(iter(by_seed.values()))["model_display_name"]
             for by_model in runs.values() for m, by_seed in by_model.items()}
    for dataset, by_model in runs.items():
        mine = [row for row in rows if row["dataset"] == dataset]
        seeds = sorted({row["n_seeds"] for row in mine if row["n_seeds"]})
        print()
        _say(f"{labels[dataset]} ({dataset}): {budget_note(by_model)}, "
             f"{'-'.join(map(str, seeds)) or 'no'} seed{'s' * (seeds != [1])} per model")
        print(f"  {'model':<14}{'test accuracy':<17}{'verdict':<21}{'parameters':>12}{'train time':>14}")
        for row in mine:
            verdict = VERDICT_WORDS.get(row["verdict"], "not compared")
            time_s = row["train_time_s_mean"]
            print(f"  {row['model']:<14}{_pm(row['test_accuracy_mean'], row['test_accuracy_std']):<17}"
                  f"{verdict:<21}{row['params']:>12,}{'-' if time_s is None else _duration(time_s):>14}")
        for line in compact_conclusion(summary[dataset], names, by_model):
            _say(line, "  ")
    hardware_used = sorted({row["timed_on"] for row in rows if row["timed_on"]})
    print()
    several = any(row["test_accuracy_std"] is not None for row in rows)
    spread = "± is the standard deviation over seeds, in points. " if several else ""
    compared = any(len(by_model) > 1 for by_model in runs.values())
    verdicts = ("Verdicts compare each model with the best on validation on the same test images "
                "(p < 0.05 in every seed to be above or below it). ") if compared else ""
    on = f"{', '.join(hardware_used) or 'its hardware'}" + (
        ", the hardware of each model's lowest seed" if several else "")
    _say(f"{spread}{verdicts}Train time: the mean per run on {on}.")
    by_note = {}  # one line for the datasets whose runs differ in the same way
    for dataset, note in mixed_settings(runs).items():
        by_note.setdefault(note, []).append(dataset)
    for note, datasets in by_note.items():
        _say(f"note: the {', '.join(datasets)} runs differ in {note}: compare with care")
    _say("The full statistics (p-values, intervals, F1, per-seed figures) are in cnn_summary.csv "
         "and cnn_runs.csv; --full-table prints them.")


def predict_hint(spec: DatasetSpec) -> str:
    """What image to try --predict with: 'a handwritten digit', or 'one of its 3 classes (a, b,
    c)' for an image folder."""
    known = {"mnist": "a handwritten digit",
             "fashion_mnist": "a piece of clothing, a shoe or a bag",
             "cifar10": "an animal or a vehicle (airplane, car, bird, cat, deer, dog, frog, horse, "
                        "ship, truck)"}
    if spec.name in known:
        return known[spec.name]
    shown_classes = ", ".join(spec.classes[:5]) + (", ..." if len(spec.classes) > 5 else "")
    return f"one of its {len(spec.classes)} classes ({shown_classes})"


def next_steps(results_dir: Path, runs: dict, datasets: list | None = None) -> None:
    """The last lines of a run or a report: the plots' folder, and one --predict command to try on
    the first dataset (of `datasets`, else of `runs`) whose records kept weights; none without."""
    folder = Path(results_dir) / "cnn"
    print(f"\nplots: {folder / 'plots'}")
    for dataset in [d for d in (datasets or runs) if d in runs]:
        records = records_of(runs[dataset])
        if any(r.get("weights") and (folder / dataset / r["weights"]).is_file() for r in records):
            _say(f"try it on your own image of {predict_hint(spec_of(records[0]))}: replace "
                 f"YOUR_IMAGE.png with its path in")
            print(f"  python cnn_project.py --predict YOUR_IMAGE.png --dataset {shlex.quote(dataset)} "
                  f"--results-dir {shlex.quote(str(results_dir))}")
            return


def _figure(plt, path: Path, fig) -> Path:
    """Save a figure as PNG (110 dpi) atomically (a full disk leaves no partial plot), close it,
    return its path."""
    try:
        _write_atomically(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_curves(plt, runs: dict, out: Path) -> list:
    """curves_<dataset>.png: training/validation loss and accuracy per epoch, every model: the mean
    over its seeds, with the band from the lowest to the highest seed."""
    paths, labels = [], data_labels(runs)
    for dataset, by_model in runs.items():
        fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
        seeds = sorted({s for by_seed in by_model.values() for s in by_seed})
        for i, by_seed in enumerate(by_model.values()):
            first = by_seed[min(by_seed)]
            n = min(len(r["history"]["epoch"]) for r in by_seed.values())
            style = "-" if first["status"] == "ok" else ":"
            for ax, key in zip(axes.flat, ("train_loss", "val_loss", "train_accuracy", "val_accuracy")):
                values = np.array([r["history"][key][:n] for r in by_seed.values()], dtype=float)
                epochs = first["history"]["epoch"][:n]
                ax.plot(epochs, values.mean(0), style, marker="o", ms=3, color=f"C{i}",
                        label=first["model_display_name"])
                if len(values) > 1:
                    ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{i}", alpha=0.2)
        for ax, title in zip(axes.flat, ("train loss (label-smoothed CE)", "validation loss (CE)",
                                         "train accuracy (augmented)", "validation accuracy")):
            ax.set_title(title)
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # no "epoch 1.5" on short runs
        axes[0, 0].legend(fontsize=8)
        spread = (f"mean of {len(seeds)} seeds, band: lowest to highest" if len(seeds) > 1
                  else f"seed {seeds[0]}")
        fig.suptitle(f"{labels[dataset]}: training curves ({budget_note(by_model)}; {spread})")
        fig.tight_layout()
        paths.append(_figure(plt, out / f"curves_{dataset}.png", fig))
    return paths


def _tick_label(row: dict) -> str:
    """A model's name under its bars: '* ' before the best on validation, ' (tied)' after a model
    tied with it within noise."""
    return ("* " if row["best"] else "") + row["model"] + (
        " (tied)" if row["verdict"] == "tied with the best within noise" else "")


def plot_test_metrics(plt, rows: list, out: Path, notes: dict) -> Path:
    """test_metrics.png: test error (100% - test accuracy) per model, one panel per dataset: a bar
    from zero (so lengths compare honestly) at the mean over seeds, a line from the lowest to the
    highest seed's error, and the accuracy written beside it; the best on validation is starred and
    drawn in colour, the models tied with it within noise are marked and shaded. Precision, recall
    and F1 stay in cnn_summary.csv and the records. 9 inches (990 px) wide."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    sizes = [1.5 + 0.42 * sum(r["dataset"] == d for r in rows) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(9, sum(sizes)), squeeze=False,
                             gridspec_kw={"height_ratios": sizes})
    for ax, dataset in zip(axes[:, 0], datasets):
        sub = [r for r in rows if r["dataset"] == dataset]
        ys = np.arange(len(sub))
        errors = np.array([100 * (1 - r["test_accuracy_mean"]) for r in sub])
        lows = [100 * (1 - (r["test_accuracy_max"] or r["test_accuracy_mean"])) for r in sub]
        highs = [100 * (1 - (r["test_accuracy_min"] or r["test_accuracy_mean"])) for r in sub]
        tied = [r["verdict"] == "tied with the best within noise" for r in sub]
        ax.barh(ys, errors, 0.6, color=["C2" if r["best"] else "C0" if t else "0.65"
                                        for r, t in zip(sub, tied)])
        ax.errorbar(errors, ys, xerr=[errors - lows, np.array(highs) - errors], fmt="none",
                    ecolor="black", lw=1, capsize=3)
        for y, high, r in zip(ys, highs, sub):  # beyond the seeds' line, so they never overlap
            ax.annotate(_accuracy_note(r), (high, y), xytext=(5, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_yticks(ys, [_tick_label(r) for r in sub], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(highs) * 1.45)
        ax.set_xlabel("test error, % of test images (lower is better)")
        seeds = sorted({r["n_seeds"] for r in sub})
        counts = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        spread = ("one seed per model" if seeds == [1] else
                  f"bar: mean of {counts} seeds; line: lowest to highest seed")
        ax.set_title(f"{sub[0]['data']}: test error per model ({notes[dataset]})\n{spread}; "
                     f"* best on validation (green); blue: tied with it within noise", fontsize=9.5)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _figure(plt, out / "test_metrics.png", fig)


def _accuracy_note(row: dict) -> str:
    """The words beside a model's bar: 'accuracy 99.12%', and '(98.90-99.30)' over its seeds."""
    note = f"accuracy {row['test_accuracy_mean']:.2%}"
    if row["n_seeds"] > 1 and row["test_accuracy_min"] is not None:
        note += f" ({100 * row['test_accuracy_min']:.2f}-{100 * row['test_accuracy_max']:.2f})"
    return note


def plot_cost(plt, rows: list, out: Path, notes: dict) -> Path:
    """cost_accuracy.png: test error (log axis, so LeNet-5 does not squash the others) against
    training compute (FLOPs) and training time (seconds, log axes), the means over seeds with the
    standard deviation as error bars; one row of panels per dataset, its budget in the title; each
    model has one colour and marker in every panel (the legend on top), and the best on validation
    is ringed."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.2 * len(datasets) + 0.8), squeeze=False)
    colours = {m: f"C{i}" for i, m in enumerate(MODELS_REGISTRY)}
    markers = {m: "osD^vP*X<>"[i % 10] for i, m in enumerate(MODELS_REGISTRY)}
    models = {}
    for row_axes, dataset in zip(axes, datasets):
        sub = [r for r in rows if r["dataset"] == dataset]
        for ax, key, xlabel in zip(row_axes, ("train_flops_mean", "train_time_s_mean"), (
                "training compute, FLOPs (forward + backward, counted)",
                f"training time, s (on {', '.join(sorted({r['timed_on'] for r in sub}))})")):
            for r in sub:
                if not r[key]:
                    continue
                x, y = r[key], 100 * (1 - r["test_accuracy_mean"])
                ax.errorbar(x, y, yerr=100 * (r["test_accuracy_std"] or 0), color=colours[r["model_key"]],
                            lw=1, capsize=3, zorder=2)
                models[r["model"]] = ax.scatter(x, y, s=55, color=colours[r["model_key"]],
                                                marker=markers[r["model_key"]], zorder=3)
                if r["best"]:
                    ax.scatter(x, y, s=300, facecolors="none", edgecolors="black", zorder=2,
                               label=f"best on validation: {r['model']}")
            shown = [r for r in sub if r[key]]
            errors = [100 * (1 - r["test_accuracy_mean"]) for r in shown]
            bars = [100 * (r["test_accuracy_std"] or 0) for r in shown]
            _log_axis(plt, ax, "x", [r[key] for r in shown], _flops_label if "flops" in key else None)
            _log_axis(plt, ax, "y", [e - b for e, b in zip(errors, bars)] +
                      [e + b for e, b in zip(errors, bars)])
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test error, % (log; lower is better)")
            ax.set_title(f"{sub[0]['data']}: test error against training "
                         f"{'compute' if key == 'train_flops_mean' else 'time'}\n({notes[dataset]})",
                         fontsize=10)
            ax.grid(alpha=0.3, which="both")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="upper right")
    one_seed = all(r["n_seeds"] == 1 for r in rows)
    fig.legend(list(models.values()), list(models), loc="upper center", ncol=len(models), fontsize=9,
               title="one seed per model" if one_seed else
               "mean over seeds; error bars: standard deviation over seeds", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / fig.get_figheight()))
    return _figure(plt, out / "cost_accuracy.png", fig)


def log_ticks(lo: float, hi: float) -> list:
    """Two to ten readable ticks inside [lo, hi] (lo > 0) for a log axis: powers of ten (two or
    more), else 1-2-5 steps (three or more), else 1-1.5-2-3-...-8 steps; a range too narrow for any of them (under a factor of about
    1.3) gets three ticks spread evenly, rounded to three significant digits, so an axis always has
    numbers."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for steps, enough in (((1,), 2), ((1, 2, 5), 3), ((1, 1.5, 2, 3, 4, 5, 6, 7, 8), 3)):
        ticks = [m * 10.0 ** e for e in range(first, last + 1) for m in steps]
        ticks = [float(f"{t:.3g}") for t in ticks if lo <= t <= hi]
        if enough <= len(ticks) <= 10:
            return ticks
    return sorted({float(f"{t:.3g}") for t in np.geomspace(lo, hi, 5)[1:4]})


def _log_axis(plt, ax, which: str, values: list, label=None) -> None:
    """Make the axes' `which` ('x' or 'y') axis a log axis spanning `values` (positive; a factor of at least 1.6 around a single
    value, 15% of the span beyond the extremes) with log_ticks as its only, labelled ticks:
    `label(v)` writes each (default '{v:g}'). Matplotlib's own log ticks can fall outside a narrow
    range, leaving an axis without numbers."""
    values = [v for v in values if v and v > 0] or [1.0]
    lo, hi = math.log10(min(values)), math.log10(max(values))
    pad = max(0.15 * (hi - lo), math.log10(1.6) - (hi - lo) / 2, 0)
    lo, hi = 10 ** (lo - pad), 10 ** (hi + pad)
    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_minor_locator(plt.NullLocator())
    axis.set_major_locator(plt.FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(plt.FuncFormatter(lambda v, _: label(v) if label else f"{v:g}"))
    getattr(ax, f"set_{which}lim")(lo, hi)


def _flops_label(v: float) -> str:
    """A FLOP count as a tick label: '$10^{12}$', '$3\\times10^{12}$'."""
    e = math.floor(math.log10(v) + 1e-9)
    m = float(f"{v / 10 ** e:.3g}")
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


CONFUSION_MATRIX_MAX_CLASSES = 30  # more classes: the most-confused pairs, not an unreadable matrix
CONFUSED_PAIRS = 20


def most_confused_pairs(matrix: np.ndarray, k: int = CONFUSED_PAIRS) -> list:
    """The k largest off-diagonal cells of a confusion matrix (rows: true class, columns: the
    predicted one) as [(true index, predicted index, test images)], largest first (ties in row,
    then column order); empty cells are left out."""
    off = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off, 0)
    cells = np.argsort(-off, axis=None, kind="stable")[:k]
    return [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(cells, off.shape))
            if off[i, j] > 0]


def plot_confusion(plt, dataset: str, r: dict, out: Path) -> Path:
    """confusion_<dataset>.png: the test confusion matrix of one run of the dataset's best model;
    with more than CONFUSION_MATRIX_MAX_CLASSES classes, its most-confused pairs instead (a bar per
    pair, most_confused_pairs): such a matrix is unreadable and takes a minute to draw."""
    from sklearn.metrics import ConfusionMatrixDisplay
    matrix, classes = r["test"]["confusion_matrix"], r["classes"]
    title = (f"{record_label(r)}: {r['model_display_name']} (best on validation)\n"
             f"seed {r['config'].get('seed', 0)}, test accuracy {r['test']['accuracy']:.2%}")
    if len(classes) <= CONFUSION_MATRIX_MAX_CLASSES:
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
        ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
    else:
        pairs = most_confused_pairs(matrix)
        fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.3 * max(1, len(pairs))))
        per_class = np.asarray(matrix).sum(1)
        bars = ax.barh(np.arange(len(pairs)), [n for *_, n in pairs], color="C3")
        ax.bar_label(bars, [f"{n} ({n / per_class[i]:.0%} of {classes[i]})" for i, _, n in pairs],
                     fontsize=7, padding=2)
        ax.set_yticks(np.arange(len(pairs)), [f"{classes[i]} → {classes[j]}" for i, j, _ in pairs],
                      fontsize=8)
        ax.invert_yaxis()
        ax.margins(x=0.35)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("test images of the true class predicted as the other")
        title += (f"\nthe {len(pairs)} most-confused pairs (true → predicted) of {len(classes)} "
                  f"classes" if pairs else "\nno test image was confused")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure(plt, out / f"confusion_{dataset}.png", fig)


def plot_misclassified(plt, dataset: str, r: dict, out: Path, columns: int = 8) -> Path | None:
    """misclassified_<dataset>.png: one run's most confident test mistakes (the best model's),
    each with its true class, the predicted class and the softmax probability given to it."""
    wrong = r["test"].get("misclassified")
    if wrong is None or not len(wrong["index"]):
        return None
    n, classes = len(wrong["index"]), r["classes"]
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.1 * rows + 0.8), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        image = wrong["image"][k].transpose(1, 2, 0)
        ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {classes[wrong['true'][k]]}\npred: {classes[wrong['predicted'][k]]}"
                     f" ({wrong['confidence'][k]:.0%})", fontsize=7.5)
    errors = int(r["test"]["n_images"] - np.trace(r["test"]["confusion_matrix"]))
    smoothing = r.get("config", {}).get("label_smoothing", RECIPE["label_smoothing"])
    cap = 1 - smoothing + smoothing / len(classes)
    shown = np.asarray(wrong["confidence"][:n], dtype=float)
    span = (f"{shown.min():.0%}" if f"{shown.min():.0%}" == f"{shown.max():.0%}"
            else f"{shown.min():.0%} to {shown.max():.0%}")
    most = "the most confident" if n == 1 else f"the {n} most confident"
    fig.suptitle(f"{record_label(r)}: {most} of {r['model_display_name']}'s "
                 f"{_count(errors, 'test mistake')} (seed {r['config'].get('seed', 0)})\n"
                 f"probability given to the wrong class shown: {span} (label smoothing {smoothing:g} "
                 f"sets the training target for a class at {cap:.0%})", fontsize=10)
    fig.tight_layout()
    return _figure(plt, out / f"misclassified_{dataset}.png", fig)


def figures_current(out: Path, dataset: str, best: bool, results_dir: Path) -> bool:
    """Whether a dataset's own figures in `out` (curves; with a best model, its confusion and
    mistakes) are all there and newer than what they are drawn from: the dataset's folder of
    records (a record written, replaced, superseded or set aside changes its time), each record,
    and this program."""
    folder = Path(results_dir) / "cnn" / dataset
    try:
        since = max(p.stat().st_mtime_ns for p in (folder, Path(__file__), *folder.glob("*.pkl")))
        drawn = [(out / f"{kind}_{dataset}.png").stat()
                 for kind in ("curves", "confusion", "misclassified")[:3 if best else 1]]
    except OSError:  # a figure not drawn yet
        return False
    return all(st.st_size > 0 and st.st_mtime_ns > since for st in drawn)


def make_plots(runs: dict, summary: dict, results_dir: Path) -> list:
    """Save PNGs under results_dir/cnn/plots and return their paths: per-dataset curves, test error
    bars, error against cost, and the best model's confusion matrix and confident mistakes (its
    lowest seed) per dataset. A dataset's own figures are drawn again only when its records changed
    (figures_current), so a report's time does not grow with datasets trained earlier; figures of a
    dataset's earlier best model are removed once the new ones are written, so none goes stale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(results_dir) / "cnn" / "plots"
    out.mkdir(parents=True, exist_ok=True)
    current = {d for d in runs if figures_current(out, d, summary[d]["best"] is not None, results_dir)}
    earlier = {*out.glob("confusion_*.png"), *out.glob("misclassified_*.png")}
    paths = [p for d in runs for p in ([out / f"curves_{d}.png"] if d in current
                                        else plot_curves(plt, {d: runs[d]}, out))]
    rows = [r for r in pair_rows(runs, summary) if r["n_seeds"]]
    if rows:
        notes = {d: budget_note(by_model) for d, by_model in runs.items()}
        paths += [plot_test_metrics(plt, rows, out, notes), plot_cost(plt, rows, out, notes)]
    for dataset, v in summary.items():
        if v["best"] is None:
            continue
        if dataset in current:
            paths += [out / f"confusion_{dataset}.png", out / f"misclassified_{dataset}.png"]
            continue
        r = runs[dataset][v["best"]][min(v["pairs"][v["best"]]["seeds"])]
        paths += [plot_confusion(plt, dataset, r, out), plot_misclassified(plt, dataset, r, out)]
    for old in earlier - set(paths):  # an earlier best model's figures, once the new ones are there
        old.unlink()
    return [p for p in paths if p is not None]


def write_report_files(runs: dict, summary: dict, results_dir: Path) -> list:
    """Write the summaries and draw the plots under the results folder's report lock
    (cnn_report.lock: two runs sharing the folder write them in turn), first removing the temp
    files a stopped report left; return the plots' paths."""
    results_dir = Path(results_dir)
    with file_lock(results_dir / "cnn_report.lock", wait=True):
        remove_temp_files([*results_dir.glob("cnn_*.tmp"),
                           *(results_dir / "cnn" / "plots").glob("*.tmp")], print)
        write_summaries(runs, summary, results_dir)
        return make_plots(runs, summary, results_dir)


def report(results_dir: Path, runs: dict | None = None, full: bool = False,
           datasets: list | None = None) -> dict:
    """Rebuild the combined pickle, the CSVs, the table and the plots from
    results_dir/cnn/*/*.pkl (or from `runs`, already collected from there by collect_runs), and
    return the summary (summarize). The table is the compact one, or with `full` the full
    statistics and every file's path; the last lines name the plots' folder and a --predict command
    (next_steps; on `datasets` first). Raises ResultsFileError if there are no records. On a folder
    that cannot be written (read-only) the table is printed and one line says the files were not
    refreshed; a full disk raises OSError (STORAGE_FAULTS) after the table."""
    runs = collect_runs(results_dir) if runs is None else runs
    if not runs:
        raise ResultsFileError(f"no results under {Path(results_dir) / 'cnn'}: train first "
                               f"(python cnn_project.py)")
    summary = summarize(runs)
    (print_table if full else print_compact_table)(runs, summary)
    try:
        plots = write_report_files(runs, summary, results_dir)
    except OSError as err:
        if err.errno not in NOT_WRITABLE:
            raise
        print(f"note: the summary and plots were not refreshed: could not write in "
              f"{Path(err.filename).parent} ({err.strerror}); the table above is complete. Choose "
              f"another --results-dir to write them.", file=sys.stderr, flush=True)
        return summary
    if full:
        print_files(results_dir, runs, plots)
    else:
        print()
        _say(f"records and weights: {Path(results_dir) / 'cnn'}/<dataset>/; a row per model: "
             f"{Path(results_dir) / 'cnn_summary.csv'}")
    next_steps(results_dir, runs, datasets)
    return summary


def print_files(results_dir: Path, runs: dict, plots: list) -> None:
    """List what a report wrote (the summaries, each dataset's records and weights, every plot)."""
    folder = Path(results_dir) / "cnn"
    print(f"\nfiles:\n  summary: {Path(results_dir) / 'cnn_results.pkl'} (every record, the spread "
          f"and verdicts), {Path(results_dir) / 'cnn_summary.csv'} (a row per model), "
          f"{Path(results_dir) / 'cnn_runs.csv'} (a row per run)")
    for dataset, by_model in runs.items():
        records = records_of(by_model)
        weights = sum(bool(r.get("weights")) and (folder / dataset / r["weights"]).is_file()
                      for r in records)
        print(f"  {dataset}: {_count(len(records), 'record')} (<model>.pkl, <model>.seed<k>.pkl), "
              f"{_count(weights, 'weights file')} (.safetensors) in {folder / dataset}")
    for p in plots:
        print(f"  plot: {p}")


# =============================================================================================
# PREDICT (a user's own image through the kept weights)
# =============================================================================================

def pair_spec(results_dir: Path, dataset: str, model: str, seed: int = 0) -> DatasetSpec:
    """The DatasetSpec a finished run was trained with: from its record (an image folder's
    classes, size and statistics), else the built-in dataset's. Raises ResultsFileError."""
    record = result_path(results_dir, dataset, model, seed)
    if record.exists():
        return spec_of(load_result(record))
    if dataset not in DATASETS:
        raise ResultsFileError(f"no record of {dataset}/{model} at {record}: train it first")
    return DATASETS[dataset]


def load_trained(results_dir: Path, dataset: str, model: str, seed: int = 0) -> nn.Module:
    """Rebuild a finished run's network from its safetensors weights, in eval mode on the CPU.
    Raises ResultsFileError (one line) when the weights are missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = weights_path(results_dir, dataset, model, seed)
    if not path.exists():
        raise ResultsFileError(f"no trained weights at {path}: train that pair first (python "
                               f"cnn_project.py --models {model} --datasets {dataset}), or point "
                               f"--results-dir at a folder that has them")
    spec = pair_spec(results_dir, dataset, model, seed)
    try:
        state = load_file(path)
        width = float(weights_metadata(path)["width"])  # the header says how it was built
        net = build_model(model, spec.in_channels, len(spec.classes), width, spec.image_size)
        net.load_state_dict(state)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise ResultsFileError(f"{path} is not usable weights of {dataset}/{model} "
                               f"({type(err).__name__}); train that pair again with --force") from None
    return net.eval()


def prepare_image(path: str, spec: DatasetSpec) -> torch.Tensor:
    """A user's image file as the training data look: uint8 1 x C x H x W.

    Opened by open_image, as the training images of an image folder are (EXIF orientation, alpha on
    white, 16-bit grey rescaled). An image folder's run: resized to its training size exactly as
    training resized (so a training image gives the very pixels it was trained on). Built-in grey
    datasets (MNIST, Fashion-MNIST): light objects on a black background, so a dark-on-light picture
    is inverted (judged by its border), the background level is subtracted and the contrast
    stretched, the object is cropped to its bounding box, scaled so its longer side is
    spec.object_size px and centred (MNIST: by its centre of mass). CIFAR-10: the centre square,
    resized. Raises ValueError (one line) for a missing file or one that open_image refuses.
    """
    from PIL import Image, ImageOps
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"--predict: no such file: {path}" if isinstance(err, FileNotFoundError)
                         else f"--predict: {path} could not be read ({err.strerror})") from None
    try:
        img, _ = open_image(data, path)
    except ValueError as err:
        raise ValueError(f"--predict: {err}") from None
    size, mode = spec.image_size, "RGB" if spec.in_channels == 3 else "L"
    if spec.torchvision_class is None:  # a learner's folder: the training transform, nothing more
        img = img.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.asarray(img).copy())
        return (x.permute(2, 0, 1) if mode == "RGB" else x[None]).unsqueeze(0)
    if spec.in_channels == 3:
        img = ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).unsqueeze(0)
    g = np.asarray(img.convert("L"), dtype=np.float32)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if border.mean() > 127:
        g, border = 255 - g, 255 - border
    g = np.clip(g - np.median(border), 0, None)
    g = g * (255 / g.max()) if g.max() > 0 else g
    rows, cols = np.nonzero(g > 0.2 * 255)
    if len(rows):
        g = g[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    scale = (spec.object_size or size) / max(g.shape)
    obj = Image.fromarray(g.astype(np.uint8)).resize(
        (max(1, round(g.shape[1] * scale)), max(1, round(g.shape[0] * scale))), Image.Resampling.LANCZOS)
    obj = np.asarray(obj, dtype=np.float32)
    top, left = (size - obj.shape[0]) // 2, (size - obj.shape[1]) // 2
    if spec.object_size and spec.object_size < size and obj.sum() > 0:  # centre of mass -> centre
        ys, xs = np.indices(obj.shape)
        top = int(np.clip(round(size / 2 - (ys * obj).sum() / obj.sum()), 0, size - obj.shape[0]))
        left = int(np.clip(round(size / 2 - (xs * obj).sum() / obj.sum()), 0, size - obj.shape[1]))
    canvas = np.zeros((size, size), dtype=np.float32)
    canvas[top:top + obj.shape[0], left:left + obj.shape[1]] = obj
    return torch.from_numpy(canvas.round().clip(0, 255).astype(np.uint8))[None, None]


def confidence_verdict(top_probability: float, rule: dict | None, stats: dict | None = None) -> str:
    """How sure one prediction is, by the record's validation-chosen rule (confidence_threshold):
    'LOW CONFIDENCE' with the reason when the image's statistics (image_statistics of that one
    image, {name: value}) fall outside the validation range or its top probability is below the
    threshold, else 'confident'; records written before the rule existed say they cannot judge."""
    if not rule:
        return ("confidence not judged: this record has no validation threshold (trained by an "
                "older version; --force retrains it)")
    for name, (low, high) in (rule.get("input_range") or {}).items():
        if stats is not None and not low <= float(stats[name]) <= high:
            return (f"LOW CONFIDENCE: the image does not look like the training images (its {name} "
                    f"is {float(stats[name]):.1f}, outside the {low:.1f}-{high:.1f} of 99% of "
                    f"validation images): do not trust this answer")
    if rule.get("target_accuracy") and rule["reliable"] >= rule["typical"]:
        meaning = (f"validation answers at least this sure were right "
                   f"{rule['target_accuracy']:.0%} of the time")
    else:
        meaning = f"{1 - rule['quantile']:.0%} of validation images reach it"
    if top_probability >= rule["threshold"]:
        return f"confident (top probability at or above {rule['threshold']:.1%}: {meaning})"
    return (f"LOW CONFIDENCE: top probability below {rule['threshold']:.1%} ({meaning}); the image "
            f"may show none of the classes: do not trust this answer")


def predict_run(results_dir: Path, dataset: str, models: list, by_model: dict | None = None) -> tuple:
    """(model, seed, record) whose weights --predict uses: the one model named, else the dataset's
    best on validation (mean over seeds) that kept weights (a note says so when that is not the
    best itself: a folder may keep only some models' weights), at its lowest seed whose weights file
    is there. `by_model`: the dataset's records ({model: {seed: record}}) when already read. Raises
    ResultsFileError (one line) when there is no such run."""
    if by_model is None:
        by_model = collect_runs(results_dir).get(dataset, {})
    runs = {dataset: by_model}
    folder = Path(results_dir) / "cnn" / dataset

    def kept(model):  # the seeds of a model whose weights file is there, lowest first
        return [s for s, r in sorted(runs[dataset].get(model, {}).items())
                if r.get("weights") and (folder / r["weights"]).is_file()]
    if len(models) == 1:
        model = models[0]
    else:
        ranked = ranked_by_validation({m: pair_spread(seeds) for m, seeds in runs[dataset].items()})
        model = next((m for m in ranked if kept(m)), ranked[0] if ranked else None)
        if model is not None and model != ranked[0]:
            print(f"note: {MODELS_REGISTRY[ranked[0]][0]}, the best on validation, kept no weights "
                  f"in {folder}; using {MODELS_REGISTRY[model][0]}, the best that did", flush=True)
    if model is None:
        raise ResultsFileError(f"no finished {dataset} records in {Path(results_dir) / 'cnn'}: "
                               f"train first, or name the model with --model")
    seeds = kept(model)
    seed = seeds[0] if seeds else 0  # none: load_trained says which file is missing
    record = runs[dataset].get(model, {}).get(seed)
    return model, seed, record


def predict(args: argparse.Namespace, top_k: int = 3) -> list:
    """Print the top-k classes (softmax probabilities) of each --predict image under one dataset's
    model, or under each model --models names (default: the validation-chosen best of
    --results-dir), and whether the answer is confident by the run's validation-chosen rule
    (confidence_verdict). A file that cannot be read gets one line in place of its answers and the
    others are answered; a ValueError naming the first such file is raised at the end. Returns
    [(path, [(class, probability), ...], verdict)], model by model. Raises ValueError /
    ResultsFileError (one line) before any answer when a model's weights are not there."""
    if len(args.datasets) != 1:
        raise ValueError("--predict needs one dataset: --dataset mnist | fashion_mnist | cifar10")
    dataset = args.datasets[0]
    nets = []  # every model's weights are checked before the first answer
    by_model = collect_runs(args.results_dir).get(dataset, {})  # read once for every model named
    for models in ([[m] for m in dict.fromkeys(args.models)] if args.models_named else [args.models]):
        model, seed, record = predict_run(args.results_dir, dataset, models, by_model)
        nets.append((model, seed, record, load_trained(args.results_dir, dataset, model, seed),
                     spec_of(record) if record is not None
                     else pair_spec(args.results_dir, dataset, model, seed)))
    out, unread = [], {}
    for model, seed, record, net, spec in nets:
        print(f"{dataset} / {MODELS_REGISTRY[model][0]}, seed {seed} "
              f"({weights_path(args.results_dir, dataset, model, seed)})")
        rule = (record or {}).get("confidence_threshold")
        for path in args.predict:
            try:
                image = prepare_image(path, spec)
            except ValueError as err:
                unread.setdefault(path, str(err).removeprefix("--predict: "))
                print(f"not answered: {unread[path]}", flush=True)
                continue
            with torch.no_grad():
                probs = net(normalize(image, spec)).float().softmax(1)[0]
            top = [(spec.classes[i], float(probs[i])) for i in probs.argsort(descending=True)[:top_k]]
            stats = {k: v[0] for k, v in image_statistics(image).items()}
            verdict = confidence_verdict(top[0][1], rule, stats)
            print(f"{path}: " + ", ".join(f"{c} {p:.1%}" for c, p in top) + f"\n  {verdict}", flush=True)
            if args.explain:
                explain_answer(args.results_dir, dataset, model, net, spec, image, path)
            out.append((path, top, verdict))
    if unread:
        first = next(iter(unread.values()))
        raise ValueError(f"--predict: {first}" if len(args.predict) == 1 else
                         f"--predict: {len(unread)} of {len(args.predict)} images not answered"
                         + (" (the others are, above)" if len(unread) < len(args.predict) else "")
                         + f"; the first: {first}")
    return out


# =============================================================================================
# INSPECTION (inside the networks: Grad-CAM, filters, feature maps, calibration, robustness)
# =============================================================================================

# --inspect draws, per dataset, from the kept seed-0 weights and every seed's record: a Grad-CAM
# grid, the first layer's filters, one image's feature maps stage by stage, the calibration
# (expected calibration error and a reliability diagram), the accuracy under corruptions, and the
# per-class accuracy of every model side by side. What it computes is kept per pair in
# <results>/cnn/inspection/<dataset>/<model>.pkl (the records are never rewritten), keyed by the
# weights file's SHA-256 and these settings, so a rerun only draws.
INSPECT_FORMAT = "cnn_project/inspection/1"
INSPECT_SEED = 0          # draws the 8 Grad-CAM images and the corruption subset, seeds the noise
CAM_IMAGES = 8
ECE_BINS = 15             # equal-width confidence bins (Guo et al., 2017, "On calibration of modern
                          # neural networks")
CORRUPTION_IMAGES = 5000  # a fixed seeded subset of the test set for every corrupted copy (the
                          # whole 10,000 would take --inspect of 21 pairs past 15 min on 2 CPU cores)
# Three severities of each corruption: CIFAR-10-C's severities 1, 3 and 5 (Hendrycks & Dietterich,
# 2019, "Benchmarking neural network robustness to common corruptions"), made with torchvision's
# transforms.v2; severity 0 is the clean image.
CORRUPTIONS = {
    "gaussian noise": (0.04, 0.08, 0.10),  # standard deviation, on the 0-1 pixel scale
    "blur": (0.4, 0.7, 1.0),               # Gaussian blur, sigma in pixels
    "contrast": (0.75, 0.4, 0.15),         # contrast factor (1 = unchanged)
    "jpeg": (80, 58, 40),                  # JPEG quality of the re-compression
}
# Grad-CAM's layer per architecture: the deepest layer whose map is still 1/4 of the input's side
# (8x8 at 32 px, 7x7 at 28 px; LeNet-5's C3: 10x10), so a map can still point at a part of the
# object; the last stages (4x4, 2x2) would paint a few coarse blocks.
CAM_LAYERS = {
    "lenet5": ("features.3", "C3 conv 5x5"),
    "alexnet": ("features.6", "conv5"),
    "vgg": ("features.8", "stage 3, last conv"),
    "resnet": ("stages.5", "end of stage 3"),
    "googlenet": ("inception.7", "Inception 4e"),
    "xception": ("entry_flow.3", "entry-flow block 256"),
    "senet": ("stages.5", "end of stage 3"),
}
# The stages whose outputs the feature-map figure shows (module paths in each network).
FEATURE_STAGES = {
    "lenet5": (("C1", "features.0"), ("S2", "features.2"), ("C3", "features.3"), ("S4", "features.5")),
    "alexnet": (("conv1", "features.0"), ("conv2", "features.2"), ("conv3", "features.4"),
                ("conv5", "features.6")),
    "vgg": (("stage 1", "features.1"), ("stage 2", "features.4"), ("stage 3", "features.8"),
            ("stage 4", "features.12"), ("stage 5", "features.16")),
    "resnet": (("stem", "stem"), ("stage 1", "stages.1"), ("stage 2", "stages.3"),
               ("stage 3", "stages.5"), ("stage 4", "stages.7")),
    "googlenet": (("stem", "stem"), ("3b", "inception.1"), ("4e", "inception.7"),
                  ("5b", "inception.10")),
    "xception": (("stem", "entry_flow.1"), ("block 128", "entry_flow.2"),
                 ("block 256", "entry_flow.3"), ("block 728", "entry_flow.4"),
                 ("middle flow", "middle_flow"), ("exit block", "exit_flow.0")),
}
FEATURE_STAGES["senet"] = FEATURE_STAGES["resnet"]
FEATURE_CHANNELS = 8      # channels shown per stage: the most active on that image
FIRST_FILTERS = 16        # first-layer filters shown per model


class InspectError(RuntimeError):
    """One pair (or one part of it) cannot be inspected; the message is one line saying why."""


def expected_calibration_error(confidence, correct, bins: int = ECE_BINS) -> float:
    """Top-1 expected calibration error (Naeini et al., 2015; Guo et al., 2017): the test images
    are put in `bins` equal-width bins of their top-1 probability, and ECE is the mean over images
    of |accuracy of its bin - mean confidence of its bin|, a fraction in [0, 1]. confidence: top-1
    softmax probabilities (N), correct: whether each top-1 answer was right (N, bool). Computed by
    torchmetrics' binary_calibration_error on (confidence, correct)."""
    from torchmetrics.functional.classification import binary_calibration_error
    confidence = torch.as_tensor(np.asarray(confidence), dtype=torch.float32)
    # torchmetrics gives a confidence of exactly 1.0 (a float16 record's rounding of one above 0.99976)
    # a bin of its own; the largest float32 below 1 puts it in the last of the `bins`, as reliability_bins does
    confidence = confidence.clamp(max=float(np.nextafter(np.float32(1), np.float32(0))))
    return float(binary_calibration_error(confidence, torch.as_tensor(np.asarray(correct)).long(),
                                          n_bins=bins, norm="l1"))


def reliability_bins(confidence, correct, bins: int = ECE_BINS) -> dict:
    """The reliability diagram's numbers: per equal-width confidence bin, the images in it
    ('count'), their accuracy and their mean confidence (fractions; 0 for an empty bin)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    which = np.clip(np.floor(confidence * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean = lambda v: np.bincount(which, weights=v, minlength=bins) / np.maximum(count, 1)  # noqa: E731
    return {"count": count, "accuracy": mean(correct), "confidence": mean(confidence)}


def run_calibration(record: dict) -> dict | None:
    """{'ece', 'bins' (reliability_bins), 'finished_utc'} of one run's test predictions, or None
    for a record without per-image confidences."""
    test = record.get("test") or {}
    if "confidence" not in test or "labels" not in test:
        return None
    correct = correct_on_test(record)
    return {"ece": expected_calibration_error(test["confidence"], correct),
            "bins": reliability_bins(test["confidence"], correct),
            "finished_utc": record.get("finished_utc")}


def corrupt(x: torch.Tensor, kind: str, severity: int, seed: int = INSPECT_SEED) -> torch.Tensor:
    """One corruption of CORRUPTIONS at severity 0 (the images unchanged), 1, 2 or 3 on uint8
    images N x C x H x W -> uint8, same shape (torchvision.transforms.v2.functional: gaussian_noise
    seeded with `seed`, gaussian_blur, adjust_contrast, jpeg). Raises KeyError for an unknown kind."""
    level = CORRUPTIONS[kind][severity - 1] if severity else None
    if level is None:
        return x
    from torchvision.transforms.v2 import functional as TF
    if kind == "gaussian noise":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            noisy = TF.gaussian_noise(x.float() / 255, sigma=level, clip=True)
        return (noisy * 255).round().to(torch.uint8)
    if kind == "blur":
        k = 2 * math.ceil(2 * level) + 1  # the kernel covers +-2 sigma
        return TF.gaussian_blur(x, [k, k], [level, level])
    if kind == "contrast":
        return TF.adjust_contrast(x, level)
    return TF.jpeg(x, quality=level)


def corrupted_sets(x: torch.Tensor) -> dict:
    """{(kind, severity): uint8 images} for every corruption at severities 1-3."""
    return {(kind, s): corrupt(x, kind, s) for kind in CORRUPTIONS for s in (1, 2, 3)}


def hook_layer(net: nn.Module, path: str, model: str) -> nn.Module:
    """The submodule at `path` ('stages.5'). Raises InspectError (one line) when there is none."""
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise InspectError(f"{model} has no layer {path!r} to hook (CAM_LAYERS / FEATURE_STAGES "
                           f"name a layer its network does not have)") from None


def grad_cam(net: nn.Module, layer: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017, "Grad-CAM: visual explanations from deep networks") of
    normalised images x (N x C x H x W) for the classes `targets` (N) at `layer`, with captum's
    LayerGradCam: the layer's channels weighted by the mean gradient of the class score, summed,
    ReLU, upsampled bilinearly to H x W and scaled to a peak of 1. Returns N x H x W in [0, 1].
    Raises InspectError when the layer's output is not an image-shaped map."""
    from captum.attr import LayerAttribution, LayerGradCam
    attr = LayerGradCam(net, layer).attribute(x, target=targets, relu_attributions=True)
    if attr.dim() != 4:
        raise InspectError(f"the Grad-CAM layer gives a {attr.dim()}-D output, not a map")
    up = LayerAttribution.interpolate(attr, tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]
    up = up.detach().float().clamp_min(0)
    return up / up.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]


def explain(net: nn.Module, model: str, spec: DatasetSpec, x_uint8: torch.Tensor) -> dict:
    """Predicted class, its probability and the Grad-CAM (at CAM_LAYERS[model]) of uint8 images
    N x C x H x W: {'predicted' (N), 'probability' (N), 'maps' (N x H x W float16), 'layer'}.
    Raises InspectError when the layer cannot be hooked."""
    path, what = CAM_LAYERS.get(model, (None, None))
    if path is None:
        raise InspectError(f"no Grad-CAM layer is chosen for {model} (add it to CAM_LAYERS)")
    layer = hook_layer(net, path, model)
    x = normalize(x_uint8, spec).contiguous()
    with torch.no_grad():
        probs = net(x).float().softmax(1)
    p, predicted = probs.max(1)
    maps = grad_cam(net, layer, x, predicted)
    return {"predicted": predicted.numpy(), "probability": p.numpy(),
            "maps": maps.numpy().astype(np.float16), "layer": f"{what} ({path})"}


def first_filters(net: nn.Module) -> np.ndarray:
    """The first convolution's first FIRST_FILTERS filters, out x in x k x k (float32)."""
    conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    return conv.weight.detach()[:FIRST_FILTERS].float().numpy()


def stage_maps(net: nn.Module, model: str, spec: DatasetSpec, x_uint8: torch.Tensor) -> list:
    """[(stage, path, maps FEATURE_CHANNELS x h x w float16)]: one image's (1 x C x H x W) feature
    maps after each of FEATURE_STAGES[model], the most active channels first. Raises InspectError
    when a stage cannot be hooked."""
    seen, handles = {}, []
    for label, path in FEATURE_STAGES.get(model, ()):
        layer = hook_layer(net, path, model)
        handles.append(layer.register_forward_hook(
            lambda mod, args, out, label=label: seen.__setitem__(label, out.detach().float()[0])))
    try:
        with torch.no_grad():
            net(normalize(x_uint8, spec))
    finally:
        for h in handles:
            h.remove()
    out = []
    for label, path in FEATURE_STAGES.get(model, ()):
        maps = seen[label]
        top = maps.mean((1, 2)).argsort(descending=True)[:FEATURE_CHANNELS]
        out.append((label, path, maps[top].numpy().astype(np.float16)))
    return out


def predicted_labels(net: nn.Module, x_uint8: torch.Tensor, spec: DatasetSpec, batch: int = 500) -> np.ndarray:
    """Top-1 classes (int16, N) of uint8 images N x C x H x W, with bf16 autocast on a CPU with
    native bf16 (as the records were scored), fp32 elsewhere."""
    bf16 = choose_precision("auto", on_cpu=True)[0] == "bf16"
    net, out = net.to(memory_format=torch.channels_last), []  # normalize's layout, as in training
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(x_uint8), batch):
            out.append(net(normalize(x_uint8[i:i + batch], spec)).argmax(1))
    return torch.cat(out).numpy().astype(np.int16)


def inspection_path(results_dir: Path, dataset: str, model: str) -> Path:
    """Where --inspect keeps what it computed for one pair: <results>/cnn/inspection/<dataset>/
    <model>.pkl (the records and weights are left as they are)."""
    return Path(results_dir) / "cnn" / "inspection" / dataset / f"{model}.pkl"


def read_inspection(results_dir: Path, dataset: str, model: str) -> dict:
    """A pair's inspection file as a dict ({} when there is none, or it is unreadable or of
    another format: it is computed again)."""
    try:
        with open(inspection_path(results_dir, dataset, model), "rb") as f:
            found = pickle.load(f)
    except Exception:  # noqa: BLE001 - missing, truncated or foreign: recompute
        return {}
    return found if isinstance(found, dict) and found.get("format") == INSPECT_FORMAT else {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hashlib.file_digest where Python has it)."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        return hashlib.sha256(f.read()).hexdigest()


def weights_metadata(path: Path) -> dict:
    """The metadata save_weights wrote in a safetensors header (model, width, settings, ...).
    Raises OSError / ValueError for a file that is not safetensors."""
    import json
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return header.get("__metadata__") or {}


def check_weights_match(path: Path, record: dict) -> None:
    """Raise InspectError (one line) when a weights file's settings are not its record's (another
    run's weights copied beside it, or a record retrained without its weights); returns None."""
    import json
    try:
        stored = json.loads(weights_metadata(path)["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InspectError(f"{path} is not weights written by this program (no settings in its "
                           f"header)") from None
    own = json.loads(json.dumps(settings_of(record)))
    if stored != own:
        raise InspectError(f"{path} does not match its record's settings ("
                           f"{settings_diff(stored, own) or 'they differ'}): train that pair again "
                           f"with --force")


def inspection_key(results_dir: Path, dataset: str, model: str) -> dict:
    """What the cached weights-based results depend on: the weights' SHA-256 and the settings."""
    return {"format": INSPECT_FORMAT, "weights": file_digest(weights_path(results_dir, dataset, model)),
            "seed": INSPECT_SEED, "cam_images": CAM_IMAGES, "corruption_images": CORRUPTION_IMAGES,
            "corruptions": CORRUPTIONS, "cam_layer": CAM_LAYERS.get(model),
            "stages": FEATURE_STAGES.get(model)}


@dataclass
class TestImages:
    """The test images --inspect draws from, the same for every model of a dataset: CAM_IMAGES
    seeded images (uint8 N x C x H x W) with their test-set indices, and a seeded subset of
    CORRUPTION_IMAGES with its indices, labels and corrupted copies ({(kind, severity): uint8})."""
    cam_x: torch.Tensor
    cam_index: np.ndarray
    cam_y: np.ndarray
    subset_index: np.ndarray
    subset_y: np.ndarray
    corrupted: dict


def test_images(spec: DatasetSpec, args, record: dict) -> TestImages:
    """Read a dataset's test set (seed 0's split) and draw TestImages from it. Raises
    DatasetUnavailable, or InspectError when these test images are not the ones the record was
    scored on (other labels or another count)."""
    data = load_splits(spec, args.data_dir, 0, RECIPE["val_size"], None, torch.device("cpu"),
                       spec.image_size if spec.torchvision_class is None else None, args.cache_dir)
    labels = np.asarray(record["test"]["labels"])
    if len(data.test_y) != len(labels) or not np.array_equal(data.test_y.numpy(), labels):
        raise InspectError(f"the test images under --data-dir are not the {len(labels)} images the "
                           f"{spec.name} records were scored on: point --data-dir at that data")
    g = torch.Generator().manual_seed(INSPECT_SEED)
    order = torch.randperm(len(labels), generator=g).numpy()
    cam_index, subset_index = order[:CAM_IMAGES], np.sort(order[:CORRUPTION_IMAGES])
    subset = data.test_x[torch.from_numpy(subset_index)]
    return TestImages(data.test_x[torch.from_numpy(cam_index)], cam_index, labels[cam_index], subset_index,
                      labels[subset_index], corrupted_sets(subset))


def compute_pair(results_dir: Path, dataset: str, model: str, spec: DatasetSpec,
                 images: TestImages | None) -> dict:
    """What the weights of one pair (seed 0) show: the first filters always; with test images
    also the Grad-CAM of the CAM images, one image's stage maps and the predictions on the clean
    and corrupted subset. Hooking errors become one line in 'notes'. Raises ResultsFileError when
    the weights cannot be loaded."""
    net = load_trained(results_dir, dataset, model)
    out = {"filters": first_filters(net), "notes": [], "cam": None, "stages": None, "corrupted": None}
    if images is None:
        return out
    t0 = time.perf_counter()
    for part, make in (("cam", lambda: explain(net, model, spec, images.cam_x)),
                       ("stages", lambda: stage_maps(net, model, spec, images.cam_x[:1]))):
        try:
            out[part] = make()
        except InspectError as err:
            out["notes"].append(f"{dataset}/{model}: {err}; its {part} figure leaves it out")
    out.update(cam_x=images.cam_x.numpy(), cam_index=images.cam_index, cam_y=images.cam_y,
               subset_index=images.subset_index, subset_y=images.subset_y)
    out["corrupted"] = {key: predicted_labels(net, x, spec) for key, x in images.corrupted.items()}
    out["seconds"] = time.perf_counter() - t0
    return out


def inspect_pair(args, dataset: str, model: str, by_seed: dict, images) -> dict:
    """One pair's inspection, from its cache when it still holds: {'calibration': {seed:
    run_calibration}, 'weights': compute_pair's dict with its 'key', or None, 'robustness'}.
    `images`: a callable giving the dataset's TestImages or None (read once, on first use). Weights
    that do not match their record, or cannot be loaded, get one 'note:' line and no weights-based
    results (a pair without seed-0 weights has none; inspect_dataset names it). The cache is
    rewritten (atomically) only when something changed."""
    cached = read_inspection(args.results_dir, dataset, model)
    calibration = {s: c for s, c in (cached.get("calibration") or {}).items()
                   if s in by_seed and c and c["finished_utc"] == by_seed[s].get("finished_utc")}
    fresh = {s: run_calibration(r) for s, r in by_seed.items()
             if s not in calibration and r["status"] == "ok"}
    calibration.update(fresh)
    weights, path, record = cached.get("weights"), weights_path(args.results_dir, dataset, model), by_seed.get(0)
    changed = bool(fresh) or not cached
    try:
        if record is None or record["status"] != "ok" or not path.is_file():
            changed, weights = changed or weights is not None, None
        else:
            check_weights_match(path, record)  # the header (cheap), checked also on a cached pair
            key = inspection_key(args.results_dir, dataset, model)  # hashes the weights once
            if not weights or weights.get("key") != key or (weights["corrupted"] is None and images()):
                weights = dict(compute_pair(args.results_dir, dataset, model, spec_of(record), images()), key=key)
                changed = True
                for line in weights["notes"]:
                    print(f"note: {line}", flush=True)
    except (InspectError, ResultsFileError) as err:
        print(f"note: {dataset}/{model}: {err}", flush=True)
        changed, weights = True, None
    entry = {"format": INSPECT_FORMAT, "calibration": calibration, "weights": weights,
             "robustness": cached.get("robustness") if not changed else None}
    if changed:
        save_pickle(entry, inspection_path(args.results_dir, dataset, model))
    return entry


def lazy_test_images(spec: DatasetSpec, args, record: dict):
    """A callable that reads the dataset's TestImages on its first call and returns them then and
    after; None (after one 'note:' line) when they cannot be read."""
    kept = {}

    def get():
        if "images" not in kept:
            try:
                kept["images"] = test_images(spec, args, record)
            except (DatasetUnavailable, InspectError) as err:
                print(f"note: {spec.name}: no test images ({str(err).split('. ')[0]}): Grad-CAM, "
                      f"feature maps and corruptions are left out, the filters, calibration and "
                      f"per-class accuracy are drawn", flush=True)
                kept["images"] = None
        return kept["images"]
    return get


def robustness(dataset: str, entries: dict, by_model: dict, ranked: list) -> dict:
    """Each model's accuracy on every corrupted copy of the subset, and the verdict against the
    best on validation (or, when it kept no weights, the best on validation that did), by the
    clean comparison's rule (compare_with_best: McNemar and a paired bootstrap on the same
    corrupted images). Severity 0 is the clean subset (the record's own test predictions).
    Returns {model: {'against', 'accuracy' (mean over the corrupted copies), 'verdicts', 'rows'}}."""
    have = [m for m in ranked if (entries[m].get("weights") or {}).get("corrupted")]
    if not have:
        return {}
    against, out = have[0], {}
    if against != ranked[0]:
        print(f"note: {dataset}: {MODELS_REGISTRY[ranked[0]][0]}, the best on validation, kept no "
              f"weights; the corruptions are compared with {MODELS_REGISTRY[against][0]}", flush=True)

    def runs(model, key):  # one seed's pseudo-record: the predictions on these very images
        w = entries[model]["weights"]
        preds = (np.asarray(by_model[model][0]["test"]["predictions"])[w["subset_index"]]
                 if key is None else w["corrupted"][key])
        return {0: {"test": {"predictions": preds, "labels": w["subset_y"]}}}
    for model in have:
        rows = []
        for key in (None, *entries[model]["weights"]["corrupted"]):
            mine = runs(model, key)
            verdict = ({"verdict": "best on validation" if against == ranked[0] else "the one compared with"}
                       if model == against else compare_with_best(mine, runs(against, key)))
            kind, severity = key or ("clean", 0)
            rows.append({"dataset": dataset, "model": MODELS_REGISTRY[model][0], "corruption": kind,
                         "severity": severity, "level": CORRUPTIONS[kind][severity - 1] if severity else None,
                         "n_images": len(mine[0]["test"]["labels"]),
                         "accuracy": float(correct_on_test(mine[0]).mean()), "against": against,
                         **{k: verdict.get(k) for k in ("verdict", "difference", "ci_low", "ci_high", "p_max")}})
        corrupted = [r for r in rows if r["severity"]]
        counts = collections.Counter(VERDICT_WORDS.get(r["verdict"], r["verdict"]) for r in corrupted)
        out[model] = {"against": against, "rows": rows,
                      "accuracy": float(np.mean([r["accuracy"] for r in corrupted])),
                      "verdicts": "the one compared with" if model == against else
                      ", ".join(f"{k} in {v} of {len(corrupted)}" for k, v in counts.items())}
    return out


def _show_image(ax, x: np.ndarray) -> None:
    """Draw one uint8 image C x H x W (grey or RGB) without axes."""
    image = np.asarray(x).transpose(1, 2, 0)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_gradcam(plt, dataset: str, title: str, entries: dict, classes: tuple, out: Path) -> Path | None:
    """gradcam_<dataset>.png: the same CAM_IMAGES test images (columns) through every model with
    weights (rows): the image under its Grad-CAM, with the predicted class and its probability
    (green when right, red when wrong); each row names its model and layer."""
    rows = {m: e["weights"] for m, e in entries.items() if (e.get("weights") or {}).get("cam")}
    if not rows:
        return None
    first = next(iter(rows.values()))
    n, labels = len(first["cam_index"]), first.get("cam_y")
    fig, axes = plt.subplots(len(rows), n, figsize=(1.45 * n + 1.6, 1.6 * len(rows) + 1.0), squeeze=False)
    for i, (model, w) in enumerate(rows.items()):
        for j in range(n):
            ax, cam = axes[i, j], w["cam"]
            _show_image(ax, w["cam_x"][j])
            ax.imshow(cam["maps"][j].astype(np.float32), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            right = labels is None or cam["predicted"][j] == labels[j]
            empty = " (empty map)" if not cam["maps"][j].any() else ""  # no positive evidence there
            ax.set_title(f"{classes[cam['predicted'][j]]} {cam['probability'][j]:.0%}{empty}",
                         fontsize=7.5, color="green" if right else "red")
        axes[i, 0].set_ylabel(f"{MODELS_REGISTRY[model][0]}\n{cam['layer']}", fontsize=7)
    if labels is not None:
        for j in range(n):
            axes[0, j].set_title(f"true: {classes[labels[j]]}\n" + axes[0, j].get_title(), fontsize=7.5,
                                 color=axes[0, j].title.get_color())
    fig.suptitle(f"{title}: Grad-CAM of the predicted class (seed 0; red = where the layer's "
                 f"evidence for it is strongest)\ntitle: predicted class and its probability, green "
                 f"right, red wrong; a plausible map is not proof of what the network uses", fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"gradcam_{dataset}.png", fig)


def plot_filters(plt, dataset: str, title: str, entries: dict, out: Path) -> Path | None:
    """filters_<dataset>.png: each model's first convolution filters (rows: models), each scaled
    to its own range (grey: one input channel; colour: the RGB weights)."""
    rows = {m: e["weights"]["filters"] for m, e in entries.items() if e.get("weights")}
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), FIRST_FILTERS, figsize=(0.75 * FIRST_FILTERS + 1.6,
                                                                0.85 * len(rows) + 0.9), squeeze=False)
    for i, (model, filters) in enumerate(rows.items()):
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(j < len(filters))
            if j >= len(filters):
                continue
            f = filters[j].transpose(1, 2, 0)
            f = (f - f.min()) / max(float(f.max() - f.min()), 1e-12)
            ax.imshow(f[..., 0] if f.shape[-1] == 1 else f[..., :3], cmap="gray", vmin=0, vmax=1)
        k = filters.shape[-1]
        axes[i, 0].set_ylabel(f"{MODELS_REGISTRY[model][0]}\n{k}x{k}", fontsize=7, rotation=0,
                              ha="right", va="center")
    fig.suptitle(f"{title}: the first convolution's filters (up to {FIRST_FILTERS} per model, seed 0, "
                 f"each scaled to its own range)", fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"filters_{dataset}.png", fig)


def plot_feature_maps(plt, dataset: str, title: str, model: str, w: dict, out: Path) -> Path | None:
    """featuremaps_<dataset>.png: one test image and, per stage of one model (rows), its
    FEATURE_CHANNELS most active channels, each scaled to its own range."""
    if not w or not w.get("stages"):
        return None
    stages = w["stages"]
    fig, axes = plt.subplots(len(stages), FEATURE_CHANNELS + 1,
                             figsize=(1.1 * (FEATURE_CHANNELS + 1) + 0.6, 1.15 * len(stages) + 0.9),
                             squeeze=False)
    for i, (label, path, maps) in enumerate(stages):
        _show_image(axes[i, 0], w["cam_x"][0])
        axes[i, 0].set_ylabel(f"{label}\n{maps.shape[-1]}x{maps.shape[-2]}", fontsize=7.5)
        for j, ax in enumerate(axes[i, 1:]):
            ax.axis("off")
            if j < len(maps):
                ax.imshow(maps[j].astype(np.float32), cmap="viridis")
    fig.suptitle(f"{title}: one test image through {MODELS_REGISTRY[model][0]} (seed 0), stage by "
                 f"stage: its {FEATURE_CHANNELS} most active channels (bright = strong)", fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"featuremaps_{dataset}.png", fig)


def plot_calibration(plt, dataset: str, title: str, entries: dict, out: Path) -> Path | None:
    """calibration_<dataset>.png: a reliability diagram per model (its lowest seed): the accuracy
    of each confidence bin against the bin's mean confidence (on the diagonal = calibrated), with
    ECE's mean and standard deviation over seeds in each panel's title."""
    models = [m for m, e in entries.items() if any(e["calibration"].values())]
    if not models:
        return None
    cols = min(4, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.2 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    for ax, model in zip(axes.flat, models):
        calibration = {s: c for s, c in entries[model]["calibration"].items() if c}
        b = calibration[min(calibration)]["bins"]
        edges = np.linspace(0, 1, ECE_BINS + 1)
        used = b["count"] > 0
        ax.bar(edges[:-1][used], b["accuracy"][used], width=1 / ECE_BINS, align="edge", color="tab:blue",
               edgecolor="white", label="accuracy in the bin")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="calibrated")
        ax.plot(b["confidence"][used], b["accuracy"][used], "o", ms=2.5, color="tab:orange",
                label="(mean confidence, accuracy)")
        ece = [c["ece"] for c in calibration.values()]
        ax.set_title(f"{MODELS_REGISTRY[model][0]}: ECE {_pm(*_mean_std(ece))}", fontsize=8.5)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 probability", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    axes.flat[0].legend(fontsize=6.5, loc="upper left")
    fig.suptitle(f"{title}: reliability diagrams ({ECE_BINS} bins, lowest seed); ECE = mean over "
                 f"seeds ± standard deviation, in points", fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"calibration_{dataset}.png", fig)


def plot_robustness(plt, dataset: str, title: str, rob: dict, out: Path) -> Path | None:
    """robustness_<dataset>.png: accuracy against severity (0 = clean), one panel per corruption,
    a line per model with weights, on the same seeded subset of test images."""
    if not rob:
        return None
    fig, axes = plt.subplots(1, len(CORRUPTIONS), figsize=(3.3 * len(CORRUPTIONS), 3.6), sharey=True)
    for ax, kind in zip(axes, CORRUPTIONS):
        for i, (model, r) in enumerate(rob.items()):
            rows = [x for x in r["rows"] if x["corruption"] in (kind, "clean")]
            ax.plot([x["severity"] for x in rows], [x["accuracy"] for x in rows], "o-", ms=3,
                    color=plt.cm.tab10(i), lw=2.2 if model == r["against"] else 1.2,
                    label=MODELS_REGISTRY[model][0] + (" (compared with)" if model == r["against"] else ""))
        ax.set_title(f"{kind}: " + ", ".join(f"{v:g}" for v in CORRUPTIONS[kind]), fontsize=8.5)
        ax.set_xticks([0, 1, 2, 3])
        ax.set_xlabel("severity (0 = clean)", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy", fontsize=8)
    axes[-1].legend(fontsize=7, loc="lower left")
    n = next(iter(rob.values()))["rows"][0]["n_images"]
    half = 1.96 * math.sqrt(0.25 / n)
    fig.suptitle(f"{title}: accuracy under corruptions, seed 0, on the same {n} seeded test images "
                 f"(95% interval of one accuracy: at most ± {half:.1%}; verdicts in cnn_robustness.csv)",
                 fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"robustness_{dataset}.png", fig)


def plot_per_class(plt, dataset: str, title: str, by_model: dict, out: Path) -> Path | None:
    """per_class_<dataset>.png: a heat map of test accuracy per class (columns) for every model
    (rows), the mean over its seeds, each cell written in percent."""
    rows = {}
    for model, by_seed in by_model.items():
        values = [r["test"]["per_class_accuracy"] for r in by_seed.values()
                  if r["status"] == "ok" and r.get("test") and r["test"].get("per_class_accuracy") is not None]
        if values:
            rows[model] = np.mean(values, axis=0)
    if not rows:
        return None
    classes = next(iter(by_model.values()))[min(next(iter(by_model.values())))]["classes"]
    grid = np.array(list(rows.values()))
    fig, ax = plt.subplots(figsize=(0.8 * len(classes) + 2.5, 0.45 * len(rows) + 1.6))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=max(0.0, float(grid.min()) - 0.02), vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.1%}"[:-1], ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=7.5)
    ax.set_yticks(range(len(rows)), [MODELS_REGISTRY[m][0] for m in rows], fontsize=7.5)
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(f"{title}: test accuracy per class, % (mean over seeds)", fontsize=9)
    fig.tight_layout()
    return _figure(plt, out / f"per_class_{dataset}.png", fig)


ROBUSTNESS_COLUMNS = ("dataset", "model", "corruption", "severity", "level", "n_images", "accuracy",
                      "against", "verdict", "difference", "ci_low", "ci_high", "p_max")


def inspect_dataset(args, dataset: str, by_model: dict, summary_of_dataset: dict, plt) -> list:
    """Inspect one dataset's pairs (inspect_pair), compare their corrupted accuracies (robustness),
    keep that in each pair's inspection file, and draw the six figures; returns their paths. A
    dataset of one class gets one line and nothing else."""
    first = records_of(by_model)[0]
    spec, title = spec_of(first), record_label(first)
    if len(spec.classes) < 2:
        print(f"note: {dataset}: one class ({spec.classes[0] if spec.classes else 'none'}): there is "
              f"nothing to tell apart, so nothing to explain or calibrate; skipped", flush=True)
        return []
    chosen = [m for m in args.models if m in by_model] if args.models_named else list(by_model)
    with_seed0 = next((r for m in chosen for s, r in by_model[m].items() if s == 0 and r.get("test")), first)
    images = lazy_test_images(spec, args, with_seed0)
    entries = {m: inspect_pair(args, dataset, m, by_model[m], images) for m in chosen}
    missing = [MODELS_REGISTRY[m][0] for m in chosen
               if not weights_path(args.results_dir, dataset, m).is_file()]
    if missing:
        print(f"note: {dataset}: no seed-0 weights for {', '.join(missing)} in "
              f"{Path(args.results_dir) / 'cnn' / dataset}: {'its' if len(missing) == 1 else 'their'} "
              f"Grad-CAM, filters and corruptions are left out; calibration and per-class accuracy "
              f"come from the records", flush=True)
    ranked = [m for m in ranked_by_validation(summary_of_dataset["pairs"]) if m in entries]
    rob = robustness(dataset, entries, by_model, ranked)
    for model, entry in entries.items():
        if entry["robustness"] != rob.get(model):
            entry["robustness"] = rob.get(model)
            save_pickle(entry, inspection_path(args.results_dir, dataset, model))
    out = Path(args.results_dir) / "cnn" / "plots"
    shown = next((m for m in (chosen[:1] if args.models_named else ranked) if entries[m].get("weights")), None)
    paths = [plot_gradcam(plt, dataset, title, entries, spec.classes, out),
             plot_filters(plt, dataset, title, entries, out),
             plot_feature_maps(plt, dataset, title, shown, (entries.get(shown) or {}).get("weights"), out),
             plot_calibration(plt, dataset, title, entries, out),
             plot_robustness(plt, dataset, title, rob, out),
             plot_per_class(plt, dataset, title, {m: by_model[m] for m in chosen}, out)]
    return [p for p in paths if p is not None]


def inspect_run(args) -> list:
    """--inspect: for each dataset of --results-dir (or of --datasets), inspect its pairs and draw
    its figures under <results>/cnn/plots/, then rewrite the summaries (cnn_summary.csv and
    cnn_runs.csv gain ECE and corrupted accuracy, cnn_robustness.csv a row per corrupted copy),
    after deleting what a stopped --inspect left half-written. Returns the figures' paths. Raises
    ResultsFileError when there are no records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = collect_runs(args.results_dir)
    datasets = [d for d in (args.datasets if args.datasets_named else runs) if d in runs]
    if not datasets:
        raise ResultsFileError(f"no records of {', '.join(args.datasets)} under "
                               f"{Path(args.results_dir) / 'cnn'}: train first (python cnn_project.py)")
    summary, paths = summarize(runs), []
    with file_lock(Path(args.results_dir) / "cnn_inspect.lock", wait=True):  # one --inspect at a time here
        remove_temp_files(sorted((Path(args.results_dir) / "cnn" / "inspection").glob("*/*.tmp")), print)
        for dataset in datasets:
            t0 = time.perf_counter()
            found = inspect_dataset(args, dataset, runs[dataset], summary[dataset], plt)
            print(f"{dataset}: {_count(len(found), 'figure')} in {time.perf_counter() - t0:.0f} s", flush=True)
            paths += found
    with file_lock(Path(args.results_dir) / "cnn_report.lock", wait=True):
        write_summaries(runs, summary, args.results_dir)
    for p in paths:
        print(f"  plot: {p}")
    print(f"ECE and corrupted accuracy per model: {Path(args.results_dir) / 'cnn_summary.csv'}; every "
          f"corrupted copy's accuracy and verdict: {Path(args.results_dir) / 'cnn_robustness.csv'}")
    return paths


def merge_inspection(results_dir: Path, runs: dict, summary: dict) -> list:
    """Add what --inspect kept to the summary's pairs (in place): 'test_ece' {seed: ECE} of the
    records it still describes, their mean and standard deviation over seeds, and the corrupted
    accuracy and verdicts when the weights are the ones inspected. Returns the rows of
    cnn_robustness.csv."""
    rows = []
    for dataset, by_model in runs.items():
        for model, by_seed in by_model.items():
            found, pair = read_inspection(results_dir, dataset, model), summary[dataset]["pairs"][model]
            ece = {s: c["ece"] for s, c in (found.get("calibration") or {}).items()
                   if c and s in by_seed and by_seed[s].get("finished_utc") == c["finished_utc"]}
            pair["test_ece"] = ece
            pair["test_ece_mean"], pair["test_ece_std"] = _mean_std(list(ece.values()))
            rob, weights = found.get("robustness"), weights_path(results_dir, dataset, model)
            if rob and weights.is_file() and found["weights"]["key"]["weights"] == file_digest(weights):
                pair.update(corrupted_accuracy=rob["accuracy"], corrupted_verdicts=rob["verdicts"])
                rows += [dict(r, against=MODELS_REGISTRY[r["against"]][0]) for r in rob["rows"]]
    return rows


def explain_answer(results_dir: Path, dataset: str, model: str, net: nn.Module, spec: DatasetSpec,
                   image: torch.Tensor, source: str) -> Path | None:
    """--predict --explain: save the user's image as given, as the network sees it (1 x C x H x W
    uint8, prepare_image) and under the Grad-CAM of the answer (explain) as
    <results>/cnn/plots/explain/<image>_<8 hex of its SHA-256>_<dataset>_<model>.png (two pictures with
    one name in two folders do not overwrite each other), print its path and return it; one line and
    None when the model's layer cannot be hooked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    try:
        cam = explain(net, model, spec, image)
    except InspectError as err:
        print(f"  not explained: {err}", flush=True)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.2))
    data = Path(source).read_bytes()
    axes[0].imshow(np.asarray(open_image(data, source)[0].convert("RGB")))
    axes[0].set_title("your image", fontsize=9)
    axes[0].axis("off")
    for ax in axes[1:]:
        _show_image(ax, image[0].numpy())
    axes[2].imshow(cam["maps"][0].astype(np.float32), cmap="jet", alpha=0.45, vmin=0, vmax=1)
    side = spec.image_size
    axes[1].set_title(f"what {MODELS_REGISTRY[model][0]} sees ({side}x{side})", fontsize=9)
    axes[2].set_title(f"{spec.classes[cam['predicted'][0]]} {cam['probability'][0]:.0%}: Grad-CAM\n"
                      f"at {cam['layer']}", fontsize=8.5)
    fig.suptitle("red: where the evidence for the answer is strongest (a hint, not a proof)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    name = f"{Path(source).stem}_{hashlib.sha256(data).hexdigest()[:8]}_{dataset}_{model}.png"
    out = Path(results_dir) / "cnn" / "plots" / "explain" / name
    _figure(plt, out, fig)
    print(f"  Grad-CAM: {out}", flush=True)
    return out


# =============================================================================================
# CLI
# =============================================================================================

def versions() -> dict:
    """Library versions and hardware, stored with every result."""
    import accelerate
    import sklearn
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "accelerate": accelerate.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none (None, False)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse whose bad command line is one line on stderr, 'error: <flag and what it takes>',
    and exit status 2 (not the usage block first)."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def number_in(kind: type, low, high=None, above: bool = False):
    """An argparse `type`: a flag's text as a finite `kind` (int or float) from `low` (left out when
    `above`) to `high` (None: no upper end). Anything else ends parsing with one line naming the
    flag and this range, which the converter also carries as `.range` ('a number > 0 and <= 16')."""
    show = str if kind is int else "{:g}".format
    what = (f"{'a whole number' if kind is int else 'a number'} {'>' if above else '>='} {show(low)}"
            + ("" if high is None else f" and <= {show(high)}"))

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low)
                and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    convert.range = what
    return convert


# The accepted range of every numeric flag (checked while parsing, before any data is read).
AT_LEAST_ONE = number_in(int, 1)
LEARNING_RATE = number_in(float, 0, above=True)
WIDTH = number_in(float, 0, 16, above=True)    # 16x the papers' channels: already beyond memory
IMAGE_SIZE = number_in(int, 16, 1024)          # 16 px: the smallest input every network takes
SUBSET = number_in(int, 8)                     # fewer images than 8: one-image batches break BatchNorm
SEED = number_in(int, 0, 2**32 - 1)            # NumPy's seeds (accelerate's set_seed)
MAX_SEED_COUNT = 1000


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line; unknown model/dataset names exit with status 2."""
    p = _Parser(
        description="Train LeNet-5, AlexNet, VGG-16-BN, ResNet-18, GoogLeNet, Xception and "
                    "SE-ResNet-18 from scratch on MNIST, Fashion-MNIST and CIFAR-10, and compare them. "
                    "A run is skipped when its record has the same settings; an interrupted run "
                    "resumes from its last epoch.", formatter_class=_HelpFormatter)
    add_what_to_train(p)
    add_where_data_and_results_are(p)
    add_how_to_run(p)
    return check_args(p, p.parse_args(argv))


def add_what_to_train(p: argparse.ArgumentParser) -> None:
    """--models, --datasets and the budget and recipe flags (--epochs, --width, --batch-size, --lr,
    --preset), in the order --help lists them."""
    p.add_argument("--models", nargs="+", default=list(MODELS_REGISTRY), metavar="NAME",
                   help=f"architectures: {' '.join(MODELS_REGISTRY)}")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), metavar="NAME",
                   help=f"datasets: {' '.join(DATASETS)}, or the path of your own image folder "
                        f"(train/<class>/* and test/<class>/*, and val/<class>/* if it has one, "
                        f"or <class>/* split "
                        f"{1 - FOLDER_TEST_FRACTION:.0%}%/{FOLDER_TEST_FRACTION:.0%}% by --seed); "
                        f"CIFAR-10 is read from an image-folder copy under --data-dir ("
                        f"{', '.join(DATASETS['cifar10'].image_folders)}) when torchvision's files "
                        f"are not there")
    p.add_argument("--epochs", type=AT_LEAST_ONE,
                   help="epochs for every model on every dataset (default: the preset's epochs for "
                        f"each dataset, the same for every model); {AT_LEAST_ONE.range}")
    p.add_argument("--width", type=WIDTH,
                   help="width multiplier for every model (default: the preset's: 0.25 with the cpu "
                        f"preset, LeNet-5 1.0; 1.0 with the gpu preset); {WIDTH.range}")
    p.add_argument("--batch-size", type=AT_LEAST_ONE, default=RECIPE["batch_size"],
                   help=f"images per step; {AT_LEAST_ONE.range}")
    p.add_argument("--lr", type=LEARNING_RATE, default=RECIPE["lr"],
                   help=f"peak one-cycle learning rate; {LEARNING_RATE.range}")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                   help="epochs per dataset and width per model; auto picks gpu when CUDA is used, "
                        "else cpu")


def add_where_data_and_results_are(p: argparse.ArgumentParser) -> None:
    """--data-dir, the image-folder flags (--image-size, --no-flip, --cache-dir) and --results-dir."""
    p.add_argument("--data-dir", default="./data", help="torchvision dataset root (downloads there)")
    p.add_argument("--image-size", type=IMAGE_SIZE,
                   help="image folders: resize every image to N x N (default: the images' own "
                        f"size, which must then be one square size); {IMAGE_SIZE.range}")
    p.add_argument("--no-flip", action="store_true",
                   help="image folders: no random horizontal flips (digits, text)")
    p.add_argument("--cache-dir", default="~/.cache/cnn_project",
                   help="decoded image folders are cached here as uint8 tensors")
    p.add_argument("--results-dir", default="./results",
                   help="records, weights, checkpoints and plots go to <this>/cnn; the committed "
                        "reference run is in results/reference_cpu")


def add_how_to_run(p: argparse.ArgumentParser) -> None:
    """--seed/--seeds, --device, --precision, --subset, --force, and the two other modes (--report,
    --predict), then --full-table and --no-progress."""
    p.add_argument("--seed", type=SEED, help="one seed for the validation split, the weights and the "
                   f"batches (default: 0); {SEED.range}")
    p.add_argument("--seeds", nargs="+", type=SEED, metavar="N",
                   help="train every pair once per seed, for the spread over seeds and paired tests: "
                        "one number N means seeds 0..N-1, several numbers are the seeds; each seed's "
                        "run keeps its own record (<model>.pkl for seed 0, <model>.seed<k>.pkl); "
                        f"N from 1 to {MAX_SEED_COUNT}, seeds from 0 to {2**32 - 1}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when CUDA sees one, else the CPU")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                   help="autocast precision; auto: bf16 on a CPU with native bf16 (AVX-512 BF16 "
                        "or AMX; fp32 on other CPUs) and on GPUs of compute capability >= 8.0, "
                        "fp16 with loss scaling on 7.x (T4, V100), fp32 ('no') below; the first "
                        "log line says what was chosen and why; fp16 applies only on a CUDA GPU")
    p.add_argument("--subset", type=SUBSET,
                   help=f"cap every split at this many images (quick runs); {SUBSET.range}")
    p.add_argument("--force", action="store_true",
                   help="retrain pairs whose record has these settings (the old record is kept "
                        "in superseded/)")
    p.add_argument("--report", action="store_true", help="only rebuild table and plots from results")
    p.add_argument("--full-table", action="store_true",
                   help="after training or with --report, print the full statistics (validation "
                        "accuracy, min-max over seeds, F1, MACs, images/s, the largest p-value of "
                        "each verdict) and every file written, in place of the compact table; "
                        "cnn_summary.csv and cnn_runs.csv always hold them")
    p.add_argument("--predict", nargs="+", metavar="IMAGE",
                   help="classify your own PNG/JPG images with a trained pair's weights: the top-3 "
                        "classes and whether the answer is confident (a rule chosen on validation "
                        "images; LOW CONFIDENCE for images unlike the training data); with "
                        "--datasets NAME (or --dataset) and optionally --models NAME [NAME ...] (or "
                        "--model; each named model answers; default: the best on validation that "
                        "kept weights)")
    p.add_argument("--explain", action="store_true",
                   help="with --predict: also save your image under the Grad-CAM of the model that "
                        "answered (where in the picture the evidence for its answer is strongest) "
                        "as a PNG, and print its path")
    p.add_argument("--inspect", action="store_true",
                   help="see inside the trained networks of --results-dir: per dataset a Grad-CAM "
                        "grid, the first filters, one image's feature maps stage by stage (the first "
                        "of --models, else the best on validation), calibration (ECE, reliability "
                        "diagram), accuracy under noise, blur, low contrast and JPEG, and per-class "
                        "accuracy, drawn under <results>/cnn/plots; needs the test images "
                        "(--data-dir); --datasets and --models narrow it")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars; they are drawn only on a terminal anyway, and a log gets "
                        "one line per epoch")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Check parsed arguments and derive args.specs, args.seed_list and args.progress; an unknown
    model or dataset, a bad number or flags that conflict exit with status 2 and one line
    (p.error). args.models_named: whether --models was given (--predict answers with each)."""
    check_modes(p, args)
    check_precision(p, args)
    args.models_named = args.models is not p.get_default("models")
    args.datasets_named = args.datasets is not p.get_default("datasets")
    unknown = [n for n in args.models if n not in MODELS_REGISTRY]
    if unknown:
        p.error(f"unknown model name(s): {', '.join(unknown)}; choose from {', '.join(MODELS_REGISTRY)}")
    args.specs, folders = {}, {}
    for name in args.datasets:
        if name in DATASETS:
            spec = DATASETS[name]
        elif Path(name).is_dir():  # its own key, also where another folder has its name
            spec = folder_key(image_folder_spec(name, hflip=not args.no_flip), args.results_dir,
                              folders)
            folders[spec.name] = spec.folder
        elif (args.predict or args.report or args.inspect) and (Path(args.results_dir) / "cnn" / name).is_dir():
            spec = dataclasses.replace(image_folder_spec(name), name=name)  # trained earlier
        else:
            p.error(f"unknown dataset name {name!r} and no such folder; choose from "
                    f"{', '.join(DATASETS)} or give the path of an image folder")
        args.specs[spec.name] = spec
    args.datasets = list(args.specs)
    folder_only = [f for f in ("image_size", "no_flip") if getattr(args, f) not in (None, False)]
    if folder_only and not any(s.torchvision_class is None for s in args.specs.values()):
        p.error(f"{_flags(folder_only)} only change{'s' * (len(folder_only) == 1)} how your own image "
                f"folders are read; {', '.join(args.datasets)} {'is' if len(args.datasets) == 1 else 'are'}"
                f" read as published: leave {'it' if len(folder_only) == 1 else 'them'} out")
    if args.seeds is not None and args.seed is not None:
        p.error("give --seed or --seeds, not both")
    if args.seeds is not None and len(args.seeds) == 1 and not 1 <= args.seeds[0] <= MAX_SEED_COUNT:
        p.error(f"--seeds takes a count N from 1 to {MAX_SEED_COUNT} (seeds 0..N-1) or a list of "
                f"seeds from 0 to {2**32 - 1}")
    args.seed_list = (list(range(args.seeds[0])) if args.seeds and len(args.seeds) == 1
                      else sorted(set(args.seeds)) if args.seeds else [args.seed or 0])
    args.seed = args.seed_list[0]
    args.progress = not args.no_progress and sys.stderr.isatty()  # bars would fill a log file
    args.cache_dir = str(Path(args.cache_dir).expanduser())
    return args


# Flags that only change what training does: --report and --predict read what training wrote, so
# with either of them these would be ignored (the mode's check refuses them instead).
TRAINING_FLAGS = ("epochs", "width", "batch_size", "lr", "preset", "image_size", "no_flip", "subset",
                  "force", "seed", "seeds", "device", "precision")


def _flags(dests: list) -> str:
    """'--epochs', '--epochs and --lr', '--epochs, --lr and --force' from argparse dests."""
    names = [f"--{d.replace('_', '-')}" for d in dests]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_precision(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with one line (p.error), --precision fp16 where training would run on a CPU
    (--device cpu, or auto without a CUDA GPU): fp16 autocast with loss scaling applies only on a
    CUDA GPU, and a CPU run would train in fp32 while its record said fp16."""
    if args.precision == "fp16" and (args.device == "cpu" or
                                     (args.device == "auto" and not torch.cuda.is_available())):
        p.error("--precision fp16 applies only on a CUDA GPU (fp16 with loss scaling); on a CPU "
                "use --precision bf16 or no (fp32), or leave it at auto")


def check_modes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, with one line (p.error), flags that the chosen mode would ignore: --report with
    --predict; a training flag (TRAINING_FLAGS) with either; --models or --datasets with --report,
    which reports every record under --results-dir. A flag given its default value changes
    nothing and passes."""
    modes = [m for m in ("report", "predict", "inspect") if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"{_flags(modes)} are separate modes: give one of them")
    if (args.predict or args.inspect) and args.full_table:
        p.error(f"{_flags(modes)} prints {'its answers' if args.predict else 'figures'}, not a "
                f"table: leave --full-table out")
    if args.explain and not args.predict:
        p.error("--explain goes with --predict IMAGE: it shows where the model looked in your image")
    mode = _flags(modes) if modes else None
    if mode is None:
        return
    ignored = [f for f in TRAINING_FLAGS if getattr(args, f) != p.get_default(f)]
    if ignored:
        what = ("answers with kept weights (each model's lowest seed that kept them)" if args.predict
                else "rebuilds the table and plots from the records" if args.report
                else "draws from the kept weights and the records")
        p.error(f"{mode} {what}: {_flags(ignored)} only change{'s' * (len(ignored) == 1)} training; "
                f"leave {'it' if len(ignored) == 1 else 'them'} out, or train without {mode}")
    named = [f for f in ("models", "datasets") if getattr(args, f) is not p.get_default(f)]
    if args.report and named:
        p.error(f"--report reports every record under --results-dir: it takes no {_flags(named)}; "
                f"point --results-dir at a folder holding only the runs to report")


def run_name(dataset: str, model: str, seed: int) -> str:
    """How the log names one run: 'mnist/resnet', and 'mnist/resnet seed 2' for seeds other than 0."""
    return f"{dataset}/{model}" + (f" seed {seed}" if seed else "")


def wants_training(args: argparse.Namespace, dataset: str, model: str, seed: int, settings: dict,
                   log) -> bool:
    """Whether a run trains: not when its record has these very settings (unless --force). Says
    in one line what happens to an existing record. An unreadable record is set aside (set_aside:
    kept, one line) and the run trains again."""
    path = result_path(args.results_dir, dataset, model, seed)
    name = run_name(dataset, model, seed)
    record = load_or_set_aside(path) if path.exists() else None
    if record is not None:
        old = settings_of(record)
        if old == settings and not args.force:
            log(f"{name}: finished earlier with these settings ({path}), skipped (--force retrains)")
            return False
        why = "--force" if old == settings else f"its record has other settings ({settings_diff(old, settings)})"
        log(f"{name}: {why}: training; the old record will move to "
            f"{path.parent / 'superseded'}/ when the new one is written")
    return True


@contextlib.contextmanager
def claim_pair(args, accelerator, settings: dict, started: float, log):
    """Hold a run's lock (<model>.lock beside its record; file_lock, main process) while the
    with-block trains it, so that two runs sharing a results folder never both train it. Yields
    None when this run trains it, else why not (logged): another live run holds it, or finished
    it after `started` (time.time()). Once held, the run's leftover temp files go and, with
    --force, its checkpoint. Every process enters it; the main process decides for all."""
    dataset, model, seed = settings["dataset"], settings["model"], settings["seed"]
    path, name = result_path(args.results_dir, dataset, model, seed), run_name(dataset, model, seed)
    ckpt = checkpoint_path(args.results_dir, dataset, model, seed)
    with contextlib.ExitStack() as held:
        why_not = None
        if accelerator.is_main_process:
            holder = held.enter_context(file_lock(path.with_suffix(".lock")))
            why_not = (f"being trained by another run (pid {holder})" if holder is not None else
                       "finished by another run meanwhile"
                       if finished_since(path, settings, started if args.force else None) else None)
            if why_not:
                log(f"{name}: {why_not}: skipped here", flush=True)
            else:
                remove_temp_files([p for p in path.parent.glob("*.tmp")
                                   if pair_of(p.name) == path.stem], log)
                if args.force and ckpt.exists():
                    ckpt.unlink()
                    log(f"{name}: --force: its checkpoint is deleted, training starts at epoch 1")
        from accelerate.utils import broadcast_object_list
        yield broadcast_object_list([why_not])[0]  # the main process's answer, on every process


def finished_since(path: Path, settings: dict, since: float | None) -> bool:
    """Whether the record at `path` has these `settings` and was written at or after `since`
    (time.time(); None: at any time): another run finished it while this one was busy."""
    try:
        return (since is None or path.stat().st_mtime >= since) and (
            settings_of(load_result(path)) == settings)
    except (ResultsFileError, FileNotFoundError):
        return False


def finish_pair(args, record: dict, best_state: dict | None, log) -> None:
    """Main process: keep the old record (superseded/), write the weights, then the record (the
    pair's 'done' mark), then delete the checkpoint. A kill between any two steps loses nothing: the
    rerun resumes from the checkpoint, or finds the finished record."""
    dataset, model, seed = record["dataset"], record["model"], record["config"]["seed"]
    path = result_path(args.results_dir, dataset, model, seed)
    kept = supersede(args.results_dir, dataset, model, seed)
    if kept:
        log(f"{run_name(dataset, model, seed)}: the old record is kept as {kept}")
    record["weights"] = None
    if best_state is not None:
        record["weights"] = weights_path(args.results_dir, dataset, model, seed).name
        save_weights(weights_path(args.results_dir, dataset, model, seed), best_state, record)
    save_pickle(record, path)
    checkpoint_path(args.results_dir, dataset, model, seed).unlink(missing_ok=True)


def is_main_process() -> bool:
    """True in a single process and in the main process of a torchrun/accelerate launch."""
    from accelerate.state import PartialState
    return PartialState().is_main_process


def _count(n: int, noun: str) -> str:
    """'1 record', '7 records'."""
    return f"{n} {noun}{'s' * (n != 1)}"


def _duration(seconds: float) -> str:
    """'42 s', '12 min 05 s', '1 h 03 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# Seconds per epoch of each model with the CPU preset: the mean epoch of the 2026-12-02 CIFAR-10
# reference run (45,000 images of 3x32x32, bf16 autocast, the preset's widths, 2 AMD EPYC cores
# with AVX-512 BF16 and no AMX; docs/cnn_project.md). The same day's MNIST and Fashion-MNIST epochs
# (55,000 images of 1x28x28) took 0.71-1.06x of these, LeNet-5 0.56-0.59x: the grid's first ETA
# said 1 h 04 min for a run of 54 min 51 s. The grid's ETA starts from them
# (GridProgress) and rescales them by the pairs it has timed, so it adapts to any machine.
SECONDS_PER_EPOCH = {"lenet5": 5, "alexnet": 20, "vgg": 30, "resnet": 56, "googlenet": 109,
                     "xception": 99, "senet": 68}


class GridProgress:
    """One line per pair of the grid: 'pair k/n', the time elapsed and an ETA for the whole grid.

    A pair's estimate is SECONDS_PER_EPOCH (measured with the CPU preset) x its epochs x its share
    of the 55,000 training images. Once pairs have trained, the estimates are rescaled by how long
    those really took, so the ETA adapts to any machine; with the 'cpu' preset the table counts as
    PRIOR_SECONDS of evidence, so that one short pair (LeNet-5) does not swing the whole ETA. With
    another preset the first ETA comes after the first pair.
    """

    PRIOR_SECONDS = 300.0

    def __init__(self, plan: dict, subset: int | None, measured_preset: bool, log):
        share = min(1.0, subset / 55_000) if subset else 1.0
        self.estimate = {(d, m, seed): SECONDS_PER_EPOCH.get(m, 60) * s["epochs"] * share  # unmeasured: 60
                         for d, by_seed in plan.items() for seed, todo in by_seed.items()
                         for m, s in todo.items()}
        self.left = dict(self.estimate)
        self.done_estimate = self.done_seconds = 0.0
        self.prior = self.PRIOR_SECONDS if measured_preset else 0.0
        self.start_time, self.count, self.log = time.perf_counter(), 0, log
        self.began = time.time()  # a record written after this was written while the grid ran

    def start(self, dataset: str, model: str, seed: int, settings: dict) -> None:
        """Log the line for the run about to train."""
        self.count += 1
        evidence = self.done_estimate + self.prior  # seconds of estimate checked against the clock
        eta = ("after the first pair" if not evidence else _duration(
            (self.done_seconds + self.prior) / evidence * sum(self.left.values())))
        epochs = f"{settings['epochs']} epoch{'s' * (settings['epochs'] != 1)}"
        self.log(f"[run {self.count}/{len(self.estimate)}] {run_name(dataset, model, seed)}: {epochs} at width "
                 f"{settings['width']:g} | elapsed {_duration(time.perf_counter() - self.start_time)}"
                 f" | grid ETA {eta}", flush=True)

    def finish(self, dataset: str, model: str, seed: int, seconds: float | None) -> None:
        """Record a run as done (seconds: how long it took) or dropped (None)."""
        estimate = self.left.pop((dataset, model, seed))
        if seconds is not None:
            self.done_estimate += estimate
            self.done_seconds += seconds


def plan_grid(args: argparse.Namespace, accelerator, preset_name: str, cfg: dict,
              log) -> tuple[dict, dict]:
    """({dataset: {seed: {model: settings}}} of the requested runs that will train, {(dataset,
    seed): its image folder's listing or None}, kept so a folder is listed once per seed);
    wants_training logs why for each run. Also removes what a stopped run left (tidy_dataset_folder)."""
    plan, listings = {}, {}
    for dataset in args.datasets:
        if accelerator.is_main_process:
            tidy_dataset_folder(Path(args.results_dir) / "cnn" / dataset, log)
        for seed in args.seed_list:
            try:
                listings[dataset, seed] = data_listing(args.specs[dataset], args.data_dir,
                                                       args.image_size, seed)
                identity = data_identity(args.specs[dataset], args.data_dir, args.image_size,
                                         seed, listings[dataset, seed])
            except DatasetUnavailable:
                identity = "unavailable"  # run_grid says why when it tries to read it
            for model in args.models:
                epochs, width = budget(preset_name, dataset, model)
                settings = run_settings(model, dataset, args.epochs or epochs, args.width or width,
                                        cfg, seed, str(accelerator.mixed_precision), preset_name,
                                        args.subset, identity)
                if wants_training(args, dataset, model, seed, settings, log):
                    plan.setdefault(dataset, {}).setdefault(seed, {})[model] = settings
    accelerator.wait_for_everyone()  # what the main process tidied or set aside is seen by all
    return plan, listings


def train_pair(args, accelerator, spec: DatasetSpec, data: Splits, model: str, settings: dict,
               cfg: dict, why: str, log) -> dict:
    """Train (or resume) one run (a model on a dataset with one seed), write its record and
    weights (main process), return the record."""
    t0, seed = time.perf_counter(), settings["seed"]
    record, best_state = train_one(
        model, spec, data, settings["epochs"], settings["width"], cfg, accelerator, seed,
        show_progress=args.progress, settings=settings,
        checkpoint=checkpoint_path(args.results_dir, spec.name, model, seed))
    record["wall_time_s"] = time.perf_counter() - t0  # this process's share, if resumed
    record["finished_utc"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    record["config"] = dict(settings, device=str(accelerator.device), channels_last=True,
                            optimizer="SGD(nesterov)", schedule="one-cycle, linear",
                            precision_reason=why, num_processes=accelerator.num_processes,
                            budget_rule=BUDGET_RULE)
    record["versions"] = versions()
    record["data"] = {"label": data_label(spec, data.source), "source": data.source,
                      "spec": dataclasses.asdict(spec)}
    if accelerator.is_main_process:
        finish_pair(args, record, best_state, log)
    accelerator.wait_for_everyone()  # the next pair's skip check sees this file on all
    test = record["test"]
    log(f"{run_name(spec.name, model, seed)}: {record['status']}"
        + (f", test accuracy {test['accuracy']:.2%}" if test else "")
        + f", {record['wall_time_s']:.0f} s -> {result_path(args.results_dir, spec.name, model, seed)}",
        flush=True)
    return record


def _where(source: dict) -> str:
    """'torchvision files in data/MNIST/raw' or 'image folder data/CIFAR10-JPEG, 60000 files'."""
    if source["kind"] == "torchvision":
        return f"torchvision files in {source['path']}"
    return (f"image folder {shown(source['path'])}, {source['files']} files, "
            f"{', '.join(source['formats'])}")


def run_grid(args: argparse.Namespace) -> dict:
    """Train every requested (dataset, model) pair whose record is missing or has other settings,
    resuming an interrupted pair from its checkpoint, writing each record as soon as it is done;
    then rebuild the summaries and plots. Returns {dataset: {model: record}}."""
    accelerator = make_accelerator(args.device, args.precision)
    precision, why = choose_precision(args.precision, accelerator.device.type != "cuda")
    preset_name = args.preset if args.preset != "auto" else (
        "gpu" if accelerator.device.type == "cuda" else "cpu")
    cfg = dict(RECIPE, batch_size=args.batch_size, lr=args.lr)
    log = accelerator.print  # only the main process prints and writes; all of them train
    log(f"device {accelerator.device}, precision {accelerator.mixed_precision} ({why}), preset "
        f"{preset_name}, torch {torch.__version__}, {torch.get_num_threads()} threads x "
        f"{accelerator.num_processes} process(es), results in {Path(args.results_dir) / 'cnn'}",
        flush=True)
    plan, listings = plan_grid(args, accelerator, preset_name, cfg, log)
    grid = GridProgress(plan, args.subset, preset_name == "cpu", log)
    unavailable, elsewhere = {}, []  # {dataset: why it could not be read}; pairs another run holds
    for dataset, by_seed in plan.items():
        for seed, todo in by_seed.items():
            try:
                data = load_splits(args.specs[dataset], args.data_dir, seed, cfg["val_size"],
                                   args.subset, accelerator.device, args.image_size, args.cache_dir,
                                   args.progress, listings.get((dataset, seed)))
            except DatasetUnavailable as err:  # go on with the other datasets, fail at the end
                if accelerator.is_main_process and dataset not in unavailable:
                    print(f"error: {err}", file=sys.stderr, flush=True)
                unavailable.setdefault(dataset, str(err))
                for model in todo:
                    grid.finish(dataset, model, seed, None)
                continue
            spec = data.spec
            log(f"{dataset} ({data_label(spec, data.source)}, {_where(data.source)}), seed {seed}: "
                f"{len(data.train_y)} train / {len(data.val_y)} validation / {len(data.test_y)} "
                f"test images of {spec.in_channels}x{spec.image_size}x{spec.image_size}, "
                f"{len(spec.classes)} classes", flush=True)
            for model, settings in todo.items():
                with claim_pair(args, accelerator, settings, grid.began, log) as why_not:
                    if why_not is None:
                        grid.start(dataset, model, seed, settings)
                        record = train_pair(args, accelerator, spec, data, model, settings, cfg, why, log)
                grid.finish(dataset, model, seed, None if why_not else record["wall_time_s"])
                elsewhere += [f"{run_name(dataset, model, seed)}: {why_not}"] if why_not else []
    results = collect_runs(args.results_dir)
    if results and accelerator.is_main_process:
        report(args.results_dir, results, args.full_table, args.datasets)
    if elsewhere:  # not failed: another run that shares the results folder has them
        log(f"not trained by this run: {'; '.join(elsewhere)}. Once that run has ended, python "
            f"cnn_project.py --report shows every record.", flush=True)
    failed = [f"{run_name(d, m, seed)} ({r['failure_reason']})" for d in args.datasets
              for m in args.models for seed, r in results.get(d, {}).get(m, {}).items()
              if seed in args.seed_list and r["status"] != "ok"]
    lost = unavailable_line(unavailable)
    if failed:  # every run has its record, but not every one learned: a script must see it
        raise RunsFailed(f"{_count(len(failed), 'run')} failed, the others finished: "
                         f"{'; '.join(failed)} (their records say why; --force trains them again)"
                         + (f"; also {lost}" if lost else ""))
    if lost:
        raise DatasetUnavailable(lost)
    return results


def unavailable_line(unavailable: dict) -> str | None:
    """The last line's words for the datasets {name: why} a grid could not read, with the first
    one's cause (its first sentence when long): the report printed since may have pushed the
    error line far up. None when every dataset was read."""
    if not unavailable:
        return None
    first, why = next(iter(unavailable.items()))
    why = why if len(why) <= 300 else why.split(". ")[0] + " (what to do: see above)"
    if len(unavailable) == 1:
        return f"not trained, dataset unavailable: {first}: {why}"
    return (f"not trained, datasets unavailable: {', '.join(unavailable)} (each said why above); "
            f"the first, {first}: {why}")


def main(argv=None) -> int:
    """Entry point; returns the process exit status: 0 when every requested run finished and
    learned, 1 with one 'error:' line otherwise (a dataset unavailable, a run failed, unusable
    results, a write the disk refused), 2 for a bad command line (argparse), 130 when interrupted (finished runs kept)."""
    args = parse_args(argv)
    try:
        if args.predict:
            predict(args)
        elif args.inspect:
            inspect_run(args)
        elif args.report:
            report(args.results_dir, full=args.full_table)
        else:
            run_grid(args)
    except (DatasetUnavailable, ResultsFileError, RunsFailed, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a write the disk refused: one line, every finished run kept
        line = storage_fault(err, args.results_dir)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished pairs and the last epoch of the current one are saved; run "
              "the same command again to resume.",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
