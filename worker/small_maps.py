"""Training-time convolutions on the smallest maps as one matrix product each (CPU only).

On a 2x2 map a 3x3 convolution (padding 1) is a dense linear map from the C x 2 x 2 inputs to the O x 2 x 2
outputs, and so is a stride-2 one from 4x4 to 2x2. oneDNN's kernels are made for large maps: on 2 cores with
native bf16 (Intel Xeon, AMX), forward and backward for 256 images of the 256-channel 3x3 convolution at 2x2 took
20.7 ms in bf16 against 5.2 ms as a matrix product, and the stride-2 one from 4x4 12.9 against 5.8 ms (fp32 at
2x2: 30.2 against 10.5 ms; from 4x4, and on every larger map, the convolution won). A step of the default network
went from 200-215 to 158-166 ms in bf16 (README, "The two networks side by side"). `SmallMapConv2d` computes as
`x @ M.T`, with M built from the same weights through a fixed 0/1 tensor of kernel taps: the same function
(to rounding), the same parameters and state_dict, and outside training (evaluation, export, serving) the
ordinary convolution.
"""

from __future__ import annotations

import functools
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

DENSE_MAX_PAIRS: Final = 16  # input x output positions: a 2x2 map to a 2x2 map
DENSE_MAX_PAIRS_LOW_PRECISION: Final = 64  # under bf16 autocast, also 4x4 to 2x2


@functools.cache
def _taps(h: int, w: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """A 0/1 tensor (kernel taps, output positions, input positions): which input pixel each tap of each
    output pixel reads."""
    ho = (h + 2 * padding - kernel) // stride + 1
    wo = (w + 2 * padding - kernel) // stride + 1
    taps = torch.zeros(kernel * kernel, ho * wo, h * w)
    for i in range(kernel):
        for j in range(kernel):
            for a in range(ho):
                for b in range(wo):
                    y, x = a * stride - padding + i, b * stride - padding + j
                    if 0 <= y < h and 0 <= x < w:
                        taps[i * kernel + j, a * wo + b, y * w + x] = 1.0
    return taps


class SmallMapConv2d(nn.Conv2d):
    """A square-kernel convolution without groups, dilation or bias that trains as a matrix product on small
    maps (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kernel, stride, padding = self.kernel_size[0], self.stride[0], self.padding
        if not (self.training and x.device.type == "cpu" and isinstance(padding, tuple)):
            return super().forward(x)
        ho, wo = (h + 2 * padding[0] - kernel) // stride + 1, (w + 2 * padding[0] - kernel) // stride + 1
        low = torch.is_autocast_enabled("cpu")
        if h * w * ho * wo > (DENSE_MAX_PAIRS_LOW_PRECISION if low else DENSE_MAX_PAIRS):
            return super().forward(x)
        taps = _taps(h, w, kernel, stride, padding[0])
        o = self.out_channels
        weight = self.weight.reshape(o * c, kernel * kernel)
        if low:
            low_dtype = torch.get_autocast_dtype("cpu")
            weight, taps = weight.to(low_dtype), taps.to(low_dtype)
        # Rows (output position, out channel), columns (input position, in channel): channels-last order.
        dense = torch.einsum("xk,kpq->pxq", weight, taps).reshape(ho * wo, o, c, h * w)
        dense = dense.permute(0, 1, 3, 2).reshape(ho * wo * o, h * w * c)
        flat = x.permute(0, 2, 3, 1).reshape(n, h * w * c)
        out = F.linear(flat, dense)
        return out.reshape(n, ho, wo, o).permute(0, 3, 1, 2)


def use_small_map_kernels(model: nn.Module) -> int:
    """Swap each plain square 3x3 convolution of `model` for a `SmallMapConv2d` sharing its weights; the count."""
    swaps: list[tuple[nn.Module, str, nn.Conv2d, int, int]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Conv2d or not isinstance(child.padding, tuple):
                continue
            (stride, stride_w), (padding, padding_w) = child.stride, child.padding
            if (child.bias is None and child.groups == 1 and child.dilation == (1, 1) and child.kernel_size == (3, 3)
                    and stride == stride_w and padding == padding_w):
                swaps.append((parent, name, child, stride, padding))
    for parent, name, conv, stride, padding in swaps:
        dense = SmallMapConv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=stride, padding=padding,
                               bias=False, device=conv.weight.device)
        dense.weight = conv.weight
        setattr(parent, name, dense)
    return len(swaps)
