"""Photo renders in the training data: a fixed share of train and validation digits, never test digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.data import FULL_TRAIN, MnistSplits, load_mnist
from worker.photos import chosen


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> tuple[MnistSplits, MnistSplits]:
    cache = tmp_path_factory.mktemp("cache")
    plain = load_mnist(cache, val_size=30, limit=30)
    photos = load_mnist(cache, val_size=30, limit=30, photo_share=0.3)
    return plain, photos


def changed(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    return {int(i) for i in torch.nonzero((a != b).flatten(1).any(dim=1)).flatten()}


def test_the_chosen_share_of_train_and_validation_digits_is_shown_as_photos(
    splits: tuple[MnistSplits, MnistSplits],
) -> None:
    plain, photos = splits
    every = chosen(FULL_TRAIN, 0.3)
    assert len(every) == round(0.3 * FULL_TRAIN)
    in_train = {int(i) for i in every if i < 30}
    in_val = {int(i) - (FULL_TRAIN - 30) for i in every if i >= FULL_TRAIN - 30}
    assert in_train and changed(plain.train_x, photos.train_x) <= in_train
    assert len(changed(plain.train_x, photos.train_x)) >= len(in_train) // 2  # a render rarely equals the plain 28x28
    assert changed(plain.val_x, photos.val_x) <= in_val
    # The labels go with their digits, and the test split stays plain MNIST.
    assert torch.equal(plain.train_y, photos.train_y) and torch.equal(plain.val_y, photos.val_y)
    assert torch.equal(plain.test_x, photos.test_x)


def test_renders_are_the_same_on_every_run(tmp_path: Path, splits: tuple[MnistSplits, MnistSplits]) -> None:
    again = load_mnist(tmp_path, val_size=30, limit=30, photo_share=0.3)
    assert torch.equal(again.train_x, splits[1].train_x) and torch.equal(again.val_x, splits[1].val_x)


def test_a_render_is_a_digit_as_preprocessing_leaves_it(splits: tuple[MnistSplits, MnistSplits]) -> None:
    _, photos = splits
    for i in sorted(int(i) for i in chosen(FULL_TRAIN, 0.3) if i < 30):
        img = photos.train_x[i].numpy()
        assert img.max() > 200
        ys, xs = np.nonzero(img)
        assert abs(ys.mean() - 13.5) < 4 and abs(xs.mean() - 13.5) < 4
