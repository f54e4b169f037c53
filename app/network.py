"""The network both sides share: a 1-channel ResNet-18 sized for 28x28 digits."""

from __future__ import annotations

import os
from typing import Final

from torch import nn
from torchvision.models import resnet18

from app.contracts import N_CLASSES

ARCH: Final = "resnet18_1ch"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), which is what torch's thread count should be."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def build_model(n_classes: int = N_CLASSES) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, so 28x28 keeps its detail."""
    model: nn.Module = resnet18(weights=None, num_classes=n_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
