"""The networks both sides share, by name: a manifest's `arch` picks one, `build_model` builds it.

Every stored model names the arch it was trained as, so a model trained before a new default keeps
loading with its own network. Training builds `TRAIN__ARCH` (the default: DEFAULT_ARCH).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import torch
from torch import nn

from app.contracts import N_CLASSES


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which is what torch's thread count should be."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX512_BF16 / AMX); elsewhere bf16 is emulated and slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resnet18_1ch() -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool: the first stage runs at 28x28
    (~1.1 GFLOP per image). The network of every model trained before the stride-2 ones.

    torchvision is imported here, not at the top: importing it costs 2.2 s of CPU (it loads torch._dynamo), and
    only this old network needs it, so a process that serves or trains the others never pays it."""
    from torchvision.models import resnet18

    model: nn.Module = resnet18(weights=None, num_classes=N_CLASSES)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions, each with a batch norm, added to the input (through `downsample`, a strided 1x1
    convolution and a batch norm, where the shape changes), then a ReLU.

    Its parameters carry the names of torchvision's `BasicBlock` (conv1, bn1, conv2, bn2, downsample.0/1), in the
    same order, so stored weights load into it and a seed gives the same initial weights as before."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Sequential | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + shortcut)
        return out


class DigitResNet(nn.Module):
    """A ResNet of `ResidualBlock`s for 28x28 digits: 3x3 stride-2 stem (conv + BN + ReLU), four stages of two
    blocks (stride 2 at the first block of stages 2-4), global average pool, linear.

    Parameter names follow torchvision's ResNet (conv1, bn1, layer1..4, fc), as does the initialisation.
    """

    def __init__(self, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Sequential] = []
        inplanes = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or inplanes != width:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(width)
                )
            first = ResidualBlock(inplanes, width, stride, downsample)
            stages.append(nn.Sequential(first, ResidualBlock(width, width)))
            inplanes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, N_CLASSES)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        logits: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
        return logits


def resnet_s2_w32() -> nn.Module:
    """The default: stem to 14x14, widths 32-64-128-256 (stages at 14, 7, 4, 2 px)."""
    return DigitResNet((32, 64, 128, 256))


def resnet_s2_w48() -> nn.Module:
    """Widths 48-96-192-384: the default network of models trained before `resnet_s2_w32`."""
    return DigitResNet((48, 96, 192, 384))


@dataclass(frozen=True)
class Arch:
    """One row of the table: how to build the network, and how it learns in the default one-epoch job.

    `lr_scale` multiplies the job's `lr` (whose default, 0.0015, is a wire contract tuned for the legacy
    network): the stride-2 networks learn best in one epoch with steps twice as large (resnet_s2_w48, seed 42:
    test 99.33% at 2x against 99.12% at 1x). `views` is how many optimiser steps each batch gives, each under its
    own random augmentation (`TRAIN__BATCH_VIEWS` overrides it): a narrow network takes more steps for the
    same time (README, "The two networks side by side").
    """

    build: Callable[[], nn.Module]
    lr_scale: float = 1.0
    views: int = 1


ARCHS: Final[Mapping[str, Arch]] = MappingProxyType({
    "resnet_s2_w32": Arch(resnet_s2_w32, lr_scale=2.0, views=3),
    "resnet_s2_w48": Arch(resnet_s2_w48, lr_scale=2.0, views=2),
    "resnet18_1ch": Arch(resnet18_1ch),
})
DEFAULT_ARCH: Final = "resnet_s2_w32"
LEGACY_ARCH: Final = "resnet18_1ch"


def build_model(arch: str = DEFAULT_ARCH) -> nn.Module:
    """A freshly initialised network of `arch`, which must be a key of ARCHS (callers refuse others first)."""
    return ARCHS[arch].build()
