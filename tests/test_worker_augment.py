"""Batched augmentations: shapes, ranges, determinism under the seed, what each modifier does, cost."""

from __future__ import annotations

import torch

from config.settings import TrainSettings
from worker.augment import (
    apply_modifiers,
    dots_and_occlusion,
    erode_dilate,
    gaussian_blur,
    random_affine,
    salt_pepper,
)


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _digits(n: int = 64) -> torch.Tensor:
    """Light strokes on black in [0, 1]: a vertical bar and a horizontal bar per image."""
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 6:22, 12:15] = 1.0
    x[:, :, 12:15, 8:20] = 0.8
    return x


ALL_ON = TrainSettings(noise_prob=0.05, dots_prob=0.5, blur_prob=0.5, morph_prob=0.5)


def test_random_affine_is_small_and_deterministic_under_the_seed() -> None:
    x = _digits()
    a = random_affine(x, _gen(1))
    b = random_affine(x, _gen(1))
    c = random_affine(x, _gen(2))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # Small: the ink mass moves little and stays (scale 0.9-1.1 changes area by at most ~21%).
    ratio = a.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3
    # Each image gets its own transform.
    assert not torch.equal(a[0], a[1])


def test_modifiers_off_change_nothing_and_draw_nothing() -> None:
    x = _digits()
    g = _gen(3)
    state = g.get_state()
    assert torch.equal(apply_modifiers(x, TrainSettings(), g), x)
    assert torch.equal(g.get_state(), state)


def test_all_modifiers_are_deterministic_under_the_seed() -> None:
    x = _digits()
    a = apply_modifiers(random_affine(x, _gen(5)), ALL_ON, _gen(5))
    b = apply_modifiers(random_affine(x, _gen(5)), ALL_ON, _gen(5))
    assert torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_salt_and_pepper_touches_about_the_given_share_of_pixels() -> None:
    x = torch.full((64, 1, 28, 28), 0.5)
    out = salt_pepper(x, 0.1, _gen())
    changed = (out != x).float().mean().item()
    assert 0.08 < changed < 0.12
    assert set(out[out != 0.5].tolist()) <= {0.0, 1.0}


def test_dots_and_occlusion_apply_to_about_the_chosen_share_of_images() -> None:
    x = _digits(400)
    out = dots_and_occlusion(x, 0.5, _gen())
    touched = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.4 < touched < 0.6


def test_blur_spreads_ink_and_keeps_its_mass() -> None:
    x = _digits()
    out = gaussian_blur(x, 1.0, _gen())
    assert (out > 0).sum() > (x > 0).sum()
    interior = out[:, :, 4:24, 4:24].sum() / x[:, :, 4:24, 4:24].sum()
    assert 0.95 < float(interior) < 1.05


def test_erosion_thins_and_dilation_thickens() -> None:
    x = _digits(200)
    out = erode_dilate(x, 1.0, _gen())
    ink_before = (x > 0).flatten(1).sum(dim=1)
    ink_after = (out > 0).flatten(1).sum(dim=1)
    assert (ink_after > ink_before).any() and (ink_after < ink_before).any()
