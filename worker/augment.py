"""Batched augmentations on float images in [0, 1], shape (N, 1, 28, 28), light ink on black.

Everything draws from the `torch.Generator` it is given, so a job's seed fixes every random choice,
and works on the whole batch at once (no per-sample Python): the random affine is one
`affine_grid` + `grid_sample`, the modifiers are masks, a grouped convolution and pooling.
"""

from __future__ import annotations

import math
from typing import Final

import torch
import torch.nn.functional as F

from config.settings import TrainSettings

MAX_ROTATE_DEG: Final = 10.0
SCALE_RANGE: Final = (0.9, 1.1)
MAX_SHIFT_PX: Final = 2.0
MAX_SHEAR_DEG: Final = 5.0
DOTS_PER_IMAGE: Final = 3
DOT_MAX_RADIUS: Final = 1  # dots are up to 3x3 px
OCCLUSION_MAX_SIDE: Final = 8
BLUR_SIGMA_RANGE: Final = (0.5, 1.1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=gen, device=gen.device) * (high - low) + low).to(device)


def random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random rotation, scale, shear and shift of every image, in one grid_sample."""
    n, _, h, w = x.shape
    dev = x.device
    angle = _uniform(n, -MAX_ROTATE_DEG, MAX_ROTATE_DEG, gen, dev) * (math.pi / 180)
    shear = _uniform(n, -MAX_SHEAR_DEG, MAX_SHEAR_DEG, gen, dev) * (math.pi / 180)
    scale = _uniform(n, SCALE_RANGE[0], SCALE_RANGE[1], gen, dev)
    # Normalised coordinates span 2 units over the image, so one pixel is 2/side.
    tx = _uniform(n, -MAX_SHIFT_PX, MAX_SHIFT_PX, gen, dev) * (2.0 / w)
    ty = _uniform(n, -MAX_SHIFT_PX, MAX_SHIFT_PX, gen, dev) * (2.0 / h)
    # theta maps output coordinates to input ones: rotation @ shear, divided by the scale, then the shift.
    cos, sin, tan, inv = torch.cos(angle), torch.sin(angle), torch.tan(shear), 1.0 / scale
    theta = torch.stack([
        torch.stack([cos * inv, (cos * tan - sin) * inv, tx], dim=1),
        torch.stack([sin * inv, (sin * tan + cos) * inv, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _chosen(n: int, prob: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, 1, 1, 1) bool: which images a modifier applies to."""
    return (torch.rand(n, generator=gen, device=gen.device) < prob).to(device).view(n, 1, 1, 1)


def salt_pepper(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=gen, device=gen.device).to(x.device)
    x = torch.where(u < prob / 2, torch.ones_like(x), x)
    return torch.where((u >= prob / 2) & (u < prob), torch.zeros_like(x), x)


def dots_and_occlusion(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """On the chosen images: DOTS_PER_IMAGE small ink dots and one black box over part of the digit."""
    n, _, h, w = x.shape
    dev = x.device
    chosen = _chosen(n, prob, gen, dev)
    ys = torch.arange(h, device=dev).view(1, 1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, 1, w)

    cy = torch.randint(0, h, (n, DOTS_PER_IMAGE), generator=gen, device=gen.device).to(dev).view(n, -1, 1, 1)
    cx = torch.randint(0, w, (n, DOTS_PER_IMAGE), generator=gen, device=gen.device).to(dev).view(n, -1, 1, 1)
    r = torch.randint(0, DOT_MAX_RADIUS + 1, (n, DOTS_PER_IMAGE), generator=gen, device=gen.device)
    r = r.to(dev).view(n, -1, 1, 1)
    dots = (((ys - cy).abs() <= r) & ((xs - cx).abs() <= r)).any(dim=1, keepdim=True)

    side = torch.randint(3, OCCLUSION_MAX_SIDE + 1, (n, 2), generator=gen, device=gen.device).to(dev)
    top = torch.randint(4, h - 4, (n,), generator=gen, device=gen.device).to(dev).view(n, 1, 1, 1)
    left = torch.randint(4, w - 4, (n,), generator=gen, device=gen.device).to(dev).view(n, 1, 1, 1)
    box = ((ys >= top) & (ys < top + side[:, 0].view(n, 1, 1, 1))
           & (xs >= left) & (xs < left + side[:, 1].view(n, 1, 1, 1)))

    out = torch.where(box, torch.zeros_like(x), x)
    out = torch.where(dots, torch.ones_like(x), out)
    return torch.where(chosen, out, x)


def gaussian_blur(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """5x5 Gaussian with a per-image sigma, as one grouped convolution over the batch."""
    n, c, h, w = x.shape
    dev = x.device
    chosen = _chosen(n, prob, gen, dev)
    sigma = _uniform(n, BLUR_SIGMA_RANGE[0], BLUR_SIGMA_RANGE[1], gen, dev).to(x.dtype)
    offsets = torch.arange(-2, 3, device=dev, dtype=x.dtype)
    k1 = torch.exp(-(offsets.view(1, 5) ** 2) / (2 * sigma.view(n, 1) ** 2))
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    kernels = (k1.view(n, 5, 1) * k1.view(n, 1, 5)).view(n, 1, 5, 5)
    blurred = F.conv2d(x.reshape(1, n * c, h, w), kernels, padding=2, groups=n).view(n, c, h, w)
    return torch.where(chosen, blurred, x)


def erode_dilate(x: torch.Tensor, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Thicker (dilation) or thinner (erosion) strokes, half each, on the chosen images."""
    n = x.shape[0]
    dev = x.device
    chosen = _chosen(n, prob, gen, dev)
    dilate = _chosen(n, 0.5, gen, dev)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(chosen, torch.where(dilate, dilated, eroded), x)


def apply_modifiers(x: torch.Tensor, mods: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """The optional modifiers (TRAIN__*_PROB) in a fixed order; one with probability 0 draws nothing and costs
    nothing."""
    if mods.morph_prob > 0:
        x = erode_dilate(x, mods.morph_prob, gen)
    if mods.blur_prob > 0:
        x = gaussian_blur(x, mods.blur_prob, gen)
    if mods.dots_prob > 0:
        x = dots_and_occlusion(x, mods.dots_prob, gen)
    if mods.noise_prob > 0:
        x = salt_pepper(x, mods.noise_prob, gen)
    return x
