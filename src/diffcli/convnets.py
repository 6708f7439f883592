"""The reference classifier's two networks (classifier.py trains, scores and saves them).

A VGG-style CNN for grey digits (3x3 conv + BatchNorm + ReLU, two poolings, global average
pool; 35k parameters, 99.5% on MNIST) and, for colour images, a ResNet-9 after Page's
DAWNBench CIFAR-10 network (2018) at a quarter of its width (0.41M parameters). Their
pooled features, the layer before the linear head, are the classifier-FD's feature space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffcli.errors import UserError


@dataclass
class ClassifierConfig:
    in_channels: int
    image_size: int
    num_classes: int
    width: int = 16  # channels at full resolution: the CNN's 10 epochs give 99.5% on MNIST in ~95 s on 2 CPU cores
    arch: str = "cnn"  # "cnn" or "resnet" (arch_for); files written before the ResNet hold the CNN
    # Judge an image and its mirror image together (their features averaged), for data whose
    # mirror images are the same class: on CIFAR-10 it scored 86.5% where one view scored 85.3%.
    mirror: bool = False


def arch_for(channels: int, size: int) -> str:
    """The CNN learns digits to 99.5%, but on CIFAR-10 photos it stalls far below what a
    judge needs (docs/evaluation.md); colour images get the ResNet, unless they are too
    small for its three poolings."""
    return "resnet" if channels == 3 and size >= 8 else "cnn"


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(*_conv(channels, channels), *_conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _cnn(c: int, w: int) -> list[nn.Module]:
    return [*_conv(c, w), *_conv(w, w), nn.MaxPool2d(2), *_conv(w, 2 * w), *_conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1)]


def _resnet(c: int, w: int) -> list[nn.Module]:
    """ResNet-9 (Page 2018): prep, then three stages that double the width and halve the
    size, the first and last with a residual pair of convs. At w = 16 a training image
    costs 0.14 GFLOP at 32x32. Global average pooling where Page takes the maximum: the
    features feed a Fréchet distance, which fits a Gaussian to them, as Inception's pooled
    averages do (86.1% on CIFAR-10 against the maximum's 86.5%, docs/evaluation.md)."""
    return [*_conv(c, w),
            *_conv(w, 2 * w), nn.MaxPool2d(2), _Residual(2 * w),
            *_conv(2 * w, 4 * w), nn.MaxPool2d(2),
            *_conv(4 * w, 8 * w), nn.MaxPool2d(2), _Residual(8 * w),
            nn.AdaptiveAvgPool2d(1)]


class Classifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        if cfg.arch not in ("cnn", "resnet"):
            raise UserError(f"unknown classifier architecture '{cfg.arch}' (cnn or resnet).")
        self.cfg = cfg
        body = _resnet if cfg.arch == "resnet" else _cnn
        self.body = nn.Sequential(*body(cfg.in_channels, cfg.width), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.feature_dim, cfg.num_classes))

    @property
    def feature_dim(self) -> int:
        return (8 if self.cfg.arch == "resnet" else 4) * self.cfg.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.mirror and not self.training:
            return (self.body(x) + self.body(x.flip(-1))) / 2  # the linear head then averages the logits
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
