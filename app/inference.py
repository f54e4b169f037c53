"""The forward pass of a served model: prepared once when the model loads, cheap on every batch.

`prepare` turns a loaded network into what answers reads: eval mode, no gradients, every batch norm folded
into the convolution before it, channels_last. `forward_probs` runs it under inference mode, in
bf16 autocast only where the CPU has native bf16 (elsewhere bf16 is emulated and slower than fp32).

Not TorchScript: `torch.jit.script` + `freeze` was 0.3 ms faster at batch 1 (2 at batch 16) on 2 AVX2
cores, but each frozen model stays in TorchScript's global compilation unit with its weights as constants,
so every hot reload grew the API by ~30 MB for good (+507 MiB in a 5-minute soak with an upload every
20 s). Nor torch.fx's fusion pass: symbolic tracing patches `nn.Module.__call__` for the whole process
while it runs, so a model loading beside reads broke them. The folding below walks the module tree instead.
The figures are in the README's benchmarks (`make bench-forward`, `make bench-soak`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Final

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from app.network import cpu_has_fast_bf16
from app.preprocess import CANVAS, to_tensor

# Test-time augmentation: the image itself and four one-pixel shifts, probabilities averaged.
TTA_SHIFTS: Final = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))

# Batches of up to this many images run on one thread. With torch's threads waiting passively (see
# app/__init__.py), waking a second thread for each layer costs more than it saves on so little work:
# batch 1 of resnet_s2_w48 took 7.5 ms on 1 thread against 11.5 ms on 2, batch 2 11.1 against 16.1;
# from batch 4 two threads win (2 AVX2 cores, `make bench-forward`).
ONE_THREAD_ROWS: Final = 2


def threads_for(images: int, threads: int, *, tta: bool = False) -> int:
    """The torch threads for a forward pass over `images` (each run TTA_SHIFTS times under `tta`): one for a
    lone read, `threads` for a batch."""
    rows = images * len(TTA_SHIFTS) if tta else images
    return 1 if rows <= ONE_THREAD_ROWS else threads


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
    """A loaded network, ready to serve: eval, no gradients, batch norms folded, channels_last."""
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    fold_batch_norms(net)
    return net.to(memory_format=torch.channels_last)


def fold_batch_norms(net: nn.Module) -> None:
    """Fold each BatchNorm2d into the Conv2d it follows, in place (an eval-mode network).

    The pairs are found by torchvision's naming, which both archs follow: `bnN` after `convN` in a module,
    and `[1]` after `[0]` in a Sequential (a downsample).
    """
    for parent in list(net.modules()):
        children = dict(parent.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.BatchNorm2d):
                continue
            conv_name = "0" if isinstance(parent, nn.Sequential) and name == "1" else name.replace("bn", "conv", 1)
            conv = children.get(conv_name)
            if isinstance(conv, nn.Conv2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, child))
                setattr(parent, name, nn.Identity())


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
