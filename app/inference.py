"""The forward pass of a served model: prepared once when the model loads, cheap on every batch.

`prepare` turns a loaded network into what answers reads: eval mode, no gradients, channels_last, then
compiled and frozen by TorchScript (batch norm folded into the convolutions, weights as constants), which
removes most of eager PyTorch's per-layer Python overhead. `forward_probs` runs it under inference
mode, in bf16 autocast only where the CPU has native bf16 (elsewhere bf16 is emulated and slower
than fp32). The figures behind these choices are in the README's benchmarks (`make bench-read`).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Final

import numpy as np
import torch
from torch import nn

from app.network import cpu_has_fast_bf16
from app.preprocess import CANVAS, to_tensor

# Test-time augmentation: the image itself and four one-pixel shifts, probabilities averaged.
TTA_SHIFTS: Final = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
# TorchScript's deprecation notices, once per model load otherwise. Installed once here, not around each
# call: `warnings.catch_warnings` is not thread-safe, and models load in worker threads.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.(script|freeze)` is deprecated", category=FutureWarning)


def pick_dtype(precision: str) -> torch.dtype | None:
    """API__PRECISION made concrete: the autocast dtype, or None for plain fp32."""
    if precision == "bf16" or (precision == "auto" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return None


def smoke_input() -> torch.Tensor:
    """Two fixed inputs: an empty canvas and a drawn '1'."""
    blank = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    one = blank.copy()
    one[4:24, 13:16] = 255
    return to_tensor(np.stack([blank, one]))


def prepare(net: nn.Module) -> nn.Module:
    """A loaded network, ready to serve: eval, no gradients, channels_last, scripted and frozen."""
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    net = net.to(memory_format=torch.channels_last)
    frozen: nn.Module = torch.jit.freeze(torch.jit.script(net))
    return frozen


def _autocast(dtype: torch.dtype | None) -> AbstractContextManager[object]:
    return nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def forward_probs(
    net: nn.Module, batch: torch.Tensor, temperature: float, *, tta: bool, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Probabilities (N x classes, fp32) for a normalised N x 1 x 28 x 28 batch."""
    with torch.inference_mode(), _autocast(dtype):
        if tta:
            views = [torch.roll(batch, shifts=shift, dims=(2, 3)) for shift in TTA_SHIFTS]
            stacked = torch.cat(views).contiguous(memory_format=torch.channels_last)
            probs = torch.softmax(net(stacked).float() / temperature, dim=1)
            return probs.reshape(len(TTA_SHIFTS), batch.shape[0], -1).mean(dim=0)
        logits = net(batch.contiguous(memory_format=torch.channels_last)).float()
        return torch.softmax(logits / temperature, dim=1)
