"""Training's matrix-product convolutions on the smallest maps (worker/small_maps.py) compute what the plain
convolutions compute, learn the same gradients, and leave the weights and everything outside training as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.network import DEFAULT_ARCH, build_model
from worker.small_maps import SmallMapConv2d, use_small_map_kernels


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    plain = build_model(DEFAULT_ARCH).to(memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    assert use_small_map_kernels(fast) > 0
    return plain, fast


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(32, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (32,), generator=gen)


def test_the_default_network_trains_to_the_same_outputs_and_gradients_with_the_same_weights() -> None:
    plain, fast = _pair()
    assert plain.state_dict().keys() == fast.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values(), strict=True))
    x, y = _batch()
    plain.train()
    fast.train()
    out_plain, out_fast = plain(x), fast(x)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-4, atol=1e-4)
    torch.autograd.backward(F.cross_entropy(out_plain, y))
    torch.autograd.backward(F.cross_entropy(out_fast, y))
    for (name, a), b in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(("channels", "side", "stride"), [(64, 2, 1), (32, 4, 2)])
def test_a_small_map_is_one_matrix_product_in_training_and_a_convolution_otherwise(
    channels: int, side: int, stride: int
) -> None:
    torch.manual_seed(0)
    conv = SmallMapConv2d(channels, 2 * channels, kernel_size=3, stride=stride, padding=1, bias=False)
    x = torch.randn(8, channels, side, side).contiguous(memory_format=torch.channels_last)
    reference = F.conv2d(x, conv.weight, stride=stride, padding=1)

    conv.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x)
    if side == 2:  # a 2x2 map is a product in fp32 too
        full = conv(x)
        assert full.grad_fn is not None and "Convolution" not in full.grad_fn.name()
        torch.testing.assert_close(full, reference, rtol=1e-4, atol=1e-4)
    assert low.grad_fn is not None and "Convolution" not in low.grad_fn.name()
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=3e-2, atol=3e-2)

    conv.eval()
    with torch.no_grad():
        assert torch.equal(conv(x), reference)  # evaluation, export and serving: the plain convolution


def test_larger_maps_keep_the_convolution() -> None:
    conv = SmallMapConv2d(8, 8, kernel_size=3, padding=1, bias=False).train()
    out = conv(torch.randn(2, 8, 7, 7))
    assert out.grad_fn is not None and "Convolution" in out.grad_fn.name()
