"""The forward pass of a served model: prepared once when the model loads, cheap on every batch.

`prepare` turns a loaded network into what answers reads. Every batch norm is folded into the convolution
before it; then, in fp32 (the default, `API__PRECISION=auto` or `fp32`), the network is exported to ONNX in
memory and run by ONNX Runtime: one graph, no per-layer Python, and its own convolution kernels. At batch 1
resnet_s2_w48 took 2.8 ms on 2 AVX2 cores against 7.0 ms for the folded torch network on one (9.0 on two;
`make bench-forward`). It wins where the CPU has native bf16 too: on 2 cores with AVX-512 and AMX, resnet_s2_w32
took 0.55 ms at batch 1 and 4.4 ms at batch 16 on ONNX Runtime against 7.4 and 10.2 ms folded in torch's bf16
autocast, so `auto` serves fp32 on every CPU. `API__PRECISION=bf16` still serves the folded torch network in bf16
autocast (ONNX Runtime's CPU kernels have no bf16 convolution): only resnet18_1ch at batch 16 gained from it there.

The export is made here from weights that were loaded safely (`torch.load(weights_only=True)`); no ONNX file is
ever read from outside. Not TorchScript `freeze`: each frozen model stayed in TorchScript's global compilation
unit, so every hot reload grew the API by ~30 MB for good; nor torch.fx, whose tracing patches
`nn.Module.__call__` for the whole process while it runs. The tracing export keeps memory flat model after
model (tests/test_archs.py).
"""

from __future__ import annotations

import tempfile
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Final

import numpy as np
import onnxruntime
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from app.decode import return_freed_heap
from app.preprocess import CANVAS, to_tensor

# What answers a batch: N x 1 x 28 x 28 (fp32) -> N x classes logits. A torch module, or an OnnxNet.
ServedNet = Callable[[torch.Tensor], torch.Tensor]

# torch announces the deprecation of its TorchScript-based exporter on every export; it is the exporter that
# needs no onnxscript, and it is what torch 2.14.1 (pinned) ships.
warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                        category=DeprecationWarning)
warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning,
                        module=r"torch\.onnx")

# Test-time augmentation: the image itself and four one-pixel shifts, probabilities averaged.
TTA_SHIFTS: Final = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))

# On the torch path (bf16), batches of up to this many images run on one thread. With torch's threads waiting
# passively (see app/__init__.py), waking a second thread for each layer costs more than it saves on so little work:
# batch 1 of resnet_s2_w48 took 7.5 ms on 1 thread against 11.5 ms on 2, batch 2 11.1 against 16.1;
# from batch 4 two threads win (2 AVX2 cores, `make bench-forward`).
ONE_THREAD_ROWS: Final = 2

# How long ONNX Runtime's threads spin for more work before they sleep, in microseconds.
SPIN_US: Final = 100


def threads_for(images: int, threads: int, *, tta: bool = False) -> int:
    """The torch threads for a forward pass over `images` (each run TTA_SHIFTS times under `tta`): one for a
    lone read, `threads` for a batch. (An OnnxNet runs on the threads it was made with, whatever this says.)"""
    rows = images * len(TTA_SHIFTS) if tta else images
    return 1 if rows <= ONE_THREAD_ROWS else threads


def pick_dtype(precision: str) -> torch.dtype | None:
    """API__PRECISION made concrete: the autocast dtype, or None for fp32 on ONNX Runtime (`auto` included: it
    beat torch's bf16 on the CPUs we measured, native bf16 and AMX included; see the module's docstring)."""
    return torch.bfloat16 if precision == "bf16" else None


def smoke_input() -> torch.Tensor:
    """Two fixed inputs: an empty canvas and a drawn '1'."""
    blank = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    one = blank.copy()
    one[4:24, 13:16] = 255
    return to_tensor(np.stack([blank, one]))


def prepare(net: nn.Module, *, dtype: torch.dtype | None = None, threads: int = 1) -> ServedNet:
    """A loaded network, ready to serve: eval, no gradients, batch norms folded; then an OnnxNet on `threads`
    threads in fp32, or the torch network in channels_last for bf16 autocast (`dtype`)."""
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    fold_batch_norms(net)
    if dtype is None:
        served = OnnxNet(to_onnx(net), threads)
        # The export's scratch: kept by malloc, the API's memory wandered by ~150 MB from one hot reload to the
        # next (no leak: flat when handed back).
        return_freed_heap()
        return served
    return net.to(memory_format=torch.channels_last)


# torch's exporter keeps its state in module globals: one export at a time (models load on several threads).
_EXPORTING: Final = threading.Lock()


def to_onnx(net: nn.Module) -> bytes:
    """An eval-mode network as an ONNX model (any batch size), made in memory."""
    with _EXPORTING, tempfile.TemporaryDirectory(prefix="onnx-") as tmp:  # torch's exporter writes to a path
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(net, (torch.zeros(1, 1, CANVAS, CANVAS),), path, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
        return path.read_bytes()


class OnnxNet:
    """An ONNX model run by ONNX Runtime on the CPU, called as a torch module is: a batch in, logits out.

    Its `threads` run each call (the caller and threads - 1 of ONNX Runtime's own, which sleep SPIN_US after a
    call, so that they leave the cores to preprocessing). `alone` is the same model on the calling thread only:
    for work whose cores are taken (a batch while other reads are being preprocessed, the promotion gate on its
    low-priority thread). Calls from several threads at once are safe.
    """

    def __init__(self, model: bytes, threads: int) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Its threads spin for the next layer's work, but only SPIN_US (longer than the gaps inside a forward
        # pass, so they sleep soon after one and leave the cores to preprocessing): a read alone took 10.6-12.6 ms
        # at p50 over HTTP against 12.4-13.6 with threads that slept at once (2 AVX2 cores, alternating runs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
        self.threads = threads
        self._session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.alone: OnnxNet = self if threads == 1 else OnnxNet(model, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        outputs = self._session.run(None, {"image": batch.contiguous().numpy()})
        return torch.from_numpy(np.asarray(outputs[0], dtype=np.float32))


def on_this_thread(net: ServedNet) -> ServedNet:
    """`net` on the calling thread alone (an OnnxNet's `alone`); a torch module runs on the caller's torch threads."""
    return net.alone if isinstance(net, OnnxNet) else net


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
    net: ServedNet, batch: torch.Tensor, temperature: float, *, tta: bool, dtype: torch.dtype | None = None
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
