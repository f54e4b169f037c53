"""The served forward pass alone, per arch and inference path: `python -m bench.forward`.

For today's network and the new one side by side, times one forward pass (the median of many, after a
warm-up) at batch 1 and batch 16 for: eager PyTorch (eval, channels_last, inference mode), batch norms
folded into the convolutions (what `app.inference.prepare` serves in bf16), and that folded network exported
to ONNX and run by ONNX Runtime (what it serves in fp32); the torch paths in fp32, and in bf16 autocast where
the CPU has native bf16 (`--bf16` forces it elsewhere, where it is emulated).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from app.inference import OnnxNet, ServedNet, fold_batch_norms, forward_probs, to_onnx
from app.network import DEFAULT_ARCH, LEGACY_ARCH, available_cores, build_model, cpu_has_fast_bf16
from bench.cpu import cpu_line


def eager(arch: str) -> nn.Module:
    net = build_model(arch).eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net.to(memory_format=torch.channels_last)


def folded(arch: str) -> nn.Module:
    net = eager(arch)
    fold_batch_norms(net)
    return net


def onnx_runtime(arch: str) -> ServedNet:
    return OnnxNet(to_onnx(folded(arch)), torch.get_num_threads())


def time_ms(net: ServedNet, batch: int, dtype: torch.dtype | None, seconds: float) -> float:
    x = torch.randn(batch, 1, 28, 28)
    for _ in range(5):
        forward_probs(net, x, 1.0, tta=False, dtype=dtype)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        started = time.perf_counter()
        forward_probs(net, x, 1.0, tta=False, dtype=dtype)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per cell")
    parser.add_argument("--bf16", action="store_true", help="time bf16 autocast even where it is not native")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the cores available)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or available_cores())
    torch.manual_seed(0)
    dtypes: list[torch.dtype | None] = [None]
    if args.bf16 or cpu_has_fast_bf16():
        dtypes.append(torch.bfloat16)
    print(cpu_line())
    print(f"{torch.get_num_threads()} threads; median forward time per call (ms), softmax included")
    print(f"{'arch':<14}{'path':<28}{'precision':<10}{'batch 1':>9}{'batch 16':>10}{'per img@16':>11}")
    paths: dict[str, Callable[[str], ServedNet]] = {
        "eager": eager, "BN folded, torch (bf16)": folded, "ONNX Runtime (served fp32)": onnx_runtime,
    }
    for arch in (LEGACY_ARCH, DEFAULT_ARCH):
        for path, make in paths.items():
            net = make(arch)
            for dtype in dtypes if isinstance(net, nn.Module) else [None]:
                one = time_ms(net, 1, dtype, args.seconds)
                sixteen = time_ms(net, 16, dtype, args.seconds)
                precision = "fp32" if dtype is None else "bf16"
                print(f"{arch:<14}{path:<28}{precision:<10}{one:>9.2f}{sixteen:>10.2f}{sixteen / 16:>11.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
