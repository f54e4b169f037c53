"""The training run, top to bottom: device, data on it, model, optimiser, loop, evaluation, best epoch.

Speed comes from doing less: the images stay uint8 tensors in memory (on the GPU when there is one),
a batch is one index + one batched augmentation, the model runs channels_last under autocast where
the hardware has fast low precision (bf16 on CPUs with native support, bf16/fp16 on CUDA), on a CPU the
convolutions on 2x2 maps run as matrix products (worker/small_maps.py) and AdamW is the fused one, and the
optimiser and schedule (AdamW + one-cycle) suit the default one-epoch job.

Each batch is learnt from several times (the arch's `views`, or `TRAIN__BATCH_VIEWS`), each time under its
own random augmentation: for the default network one epoch of the default job is 642 optimiser steps on 214
batches (README, "The two networks side by side"). Progress still counts batches of data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.contracts import N_CLASSES, DigitsTrainJobV1
from app.network import ARCHS, available_cores, build_model, cpu_has_fast_bf16
from app.preprocess import MNIST_MEAN, MNIST_STD
from config.settings import TrainSettings
from worker.augment import apply_modifiers, random_affine
from worker.calibrate import fit_temperature
from worker.data import MnistSplits
from worker.small_maps import use_small_map_kernels

log = logging.getLogger(__name__)

EVAL_BATCH = 1000
WEIGHT_DECAY = 5e-4
LABEL_SMOOTHING = 0.05
WARMUP_FRACTION = 0.2


@dataclass(frozen=True)
class Hardware:
    """Where a run trains: the device, the autocast dtype (None: plain fp32), the CPU threads."""

    device: torch.device
    dtype: torch.dtype | None
    threads: int

    def describe(self) -> str:
        """e.g. "cpu (2 threads, bf16)" or "cuda:0 NVIDIA H200 (bf16)"."""
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, str(self.dtype))
        if self.device.type == "cuda":
            return f"{self.device} {torch.cuda.get_device_name(self.device)} ({precision})"
        return f"cpu ({self.threads} threads, {precision})"


@dataclass(frozen=True)
class Progress:
    epoch: int
    total_epochs: int
    batch: int
    total_batches: int
    loss: float  # smoothed (exponential moving average)
    samples_per_sec: float
    pct: float
    eta_s: float
    batch_loss: float = 0.0  # this batch's own loss and accuracy
    batch_acc: float = 0.0
    avg_loss: float = 0.0  # mean loss of the epoch so far


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    total_epochs: int
    train_loss: float  # mean over the epoch's batches
    val_acc: float
    time_s: float  # training and evaluation of this epoch
    is_best: bool  # a new best validation accuracy: these weights are the ones kept


@dataclass(frozen=True)
class TrainOutcome:
    state_dict: dict[str, torch.Tensor]  # the best epoch's weights, on the CPU, contiguous fp32
    val_acc: float
    test_acc: float
    best_epoch: int
    device: str  # Hardware.describe()
    seconds: float
    train_samples: int
    augment_seconds: float  # time spent in augmentation, for the <10% budget
    history: list[dict[str, float]]
    temperature: float = 1.0  # calibrated on the validation split (worker.calibrate)


def pick_hardware(settings: TrainSettings) -> Hardware:
    """TRAIN__DEVICE, TRAIN__PRECISION and TRAIN__THREADS made concrete for this machine."""
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("TRAIN__DEVICE=cuda but CUDA is not available")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return Hardware(device, pick_precision(device, settings.precision), settings.threads or available_cores())


def pick_precision(device: torch.device, requested: str) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if requested == "fp32":
        return None
    if requested == "bf16":
        return torch.bfloat16
    if requested == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def batch_views(settings: TrainSettings) -> int:
    """Optimiser steps per batch: TRAIN__BATCH_VIEWS, or (0, the default) the arch's own."""
    return settings.batch_views or ARCHS[settings.arch].views


def _autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> the network's input, exactly as `app.preprocess.to_tensor` normalises."""
    return x.sub(MNIST_MEAN).div_(MNIST_STD)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.to(torch.float32).div_(255.0).unsqueeze(1)


def augmented_view(images: torch.Tensor, augment: bool, settings: TrainSettings, gen: torch.Generator) -> torch.Tensor:
    """A batch as the network learns from it: the random affine (when the job augments), the TRAIN__*_PROB
    modifiers, normalised, channels_last. Each call draws new random choices from `gen`."""
    x = to_unit(images)
    if augment:
        x = random_affine(x, gen)
    x = apply_modifiers(x, settings, gen)
    return normalise(x).contiguous(memory_format=torch.channels_last)


def predict_logits(
    model: nn.Module, images_u8: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> torch.Tensor:
    """fp32 logits (N x classes, on the CPU) for uint8 images, in EVAL_BATCH chunks."""
    model.eval()
    out = []
    with torch.inference_mode(), _autocast(device, dtype):
        for start in range(0, len(images_u8), EVAL_BATCH):
            x = normalise(to_unit(images_u8[start : start + EVAL_BATCH].to(device)))
            out.append(model(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, N_CLASSES)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return int((logits.argmax(dim=1) == labels.cpu()).sum().item()) / max(1, len(labels))


def evaluate(
    model: nn.Module, images_u8: torch.Tensor, labels: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> float:
    return accuracy(predict_logits(model, images_u8, device, dtype), labels)


def train(
    job: DigitsTrainJobV1,
    settings: TrainSettings,
    data: MnistSplits,
    hardware: Hardware,
    on_progress: Callable[[Progress], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> TrainOutcome:
    """The job's knobs (epochs, batch size, lr, seed, augment) and the worker's TRAIN__* settings."""
    started = time.perf_counter()
    device, dtype = hardware.device, hardware.dtype
    if device.type == "cpu":
        torch.set_num_threads(hardware.threads)
    else:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    # One seed fixes the initial weights, the order of the batches and every augmentation.
    torch.manual_seed(job.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(job.seed)
    order_gen = torch.Generator()
    order_gen.manual_seed(job.seed)

    train_x = data.train_x.to(device)
    train_y = data.train_y.to(device)
    n = len(train_x)
    batch_size = min(job.batch_size, n)
    steps = max(1, n // batch_size)  # the ragged tail is dropped; the next epoch's shuffle covers it
    total_batches = steps * job.epochs  # the optimiser takes `views` steps on each
    views = batch_views(settings)

    model = build_model(settings.arch).to(device).to(memory_format=torch.channels_last)
    on_cpu = device.type == "cpu"
    if on_cpu:
        use_small_map_kernels(model)
    lr = job.lr * ARCHS[settings.arch].lr_scale
    # The fused AdamW on the CPU: one kernel for all parameters, where the default loops over them (5-8% of a step).
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=on_cpu or None)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_batches * views, pct_start=WARMUP_FRACTION,
        div_factor=10.0, final_div_factor=100.0,
    )

    best_acc, best_epoch = -1.0, 0
    best_state: dict[str, torch.Tensor] = {}
    best_val_logits = torch.empty(0, N_CLASSES)
    history: list[dict[str, float]] = []
    augment_seconds = 0.0
    done = 0
    loop_started = time.perf_counter()
    for epoch in range(1, job.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=order_gen)[: steps * batch_size].view(steps, batch_size).to(device)
        epoch_started = time.perf_counter()
        running = loss_sum = 0.0
        for step in range(steps):
            idx = order[step]
            images, y = train_x[idx], train_y[idx]
            view_losses: list[torch.Tensor] = []
            for _ in range(views):  # each view its own augmentation of the same images
                t_aug = time.perf_counter()
                x = augmented_view(images, job.augment, settings, gen)
                augment_seconds += time.perf_counter() - t_aug

                with _autocast(device, dtype):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=LABEL_SMOOTHING)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(scaler.scale(loss))
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                view_losses.append(loss.detach())

            done += 1
            loss_value = float(torch.stack(view_losses).mean())  # one device sync per batch, as with one view
            loss_sum += loss_value
            running = loss_value if step == 0 else 0.9 * running + 0.1 * loss_value
            if on_progress is not None and ((step + 1) % settings.progress_every == 0 or step + 1 == steps):
                elapsed = time.perf_counter() - epoch_started
                per_batch = (time.perf_counter() - loop_started) / done
                batch_acc = float((logits.detach().argmax(dim=1) == y).float().mean())
                on_progress(Progress(
                    epoch=epoch, total_epochs=job.epochs, batch=step + 1, total_batches=steps,
                    loss=round(running, 5), samples_per_sec=round((step + 1) * batch_size / max(elapsed, 1e-9), 2),
                    pct=round(100.0 * done / total_batches, 2), eta_s=round(per_batch * (total_batches - done), 1),
                    batch_loss=round(loss_value, 5), batch_acc=round(batch_acc, 5),
                    avg_loss=round(loss_sum / (step + 1), 5),
                ))

        epoch_seconds = time.perf_counter() - epoch_started
        val_logits = predict_logits(model, data.val_x, device, dtype)
        val_acc = accuracy(val_logits, data.val_y)
        history.append({"epoch": float(epoch), "loss": running, "val_acc": val_acc, "seconds": epoch_seconds,
                        "eval_seconds": time.perf_counter() - epoch_started - epoch_seconds})
        log.info("epoch %d/%d: loss %.4f, val_acc %.4f", epoch, job.epochs, running, val_acc)
        is_best = val_acc > best_acc
        if is_best:
            best_acc, best_epoch, best_val_logits = val_acc, epoch, val_logits
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if on_epoch is not None:
            on_epoch(EpochReport(epoch=epoch, total_epochs=job.epochs, train_loss=round(loss_sum / steps, 5),
                                 val_acc=val_acc, time_s=round(time.perf_counter() - epoch_started, 3),
                                 is_best=is_best))

    model.load_state_dict(best_state)
    test_acc = evaluate(model, data.test_x, data.test_y, device, dtype)
    temperature = fit_temperature(best_val_logits, data.val_y)  # the best epoch's, as its weights give them
    state = {k: v.contiguous() for k, v in best_state.items()}
    return TrainOutcome(
        state_dict=state, val_acc=best_acc, test_acc=test_acc, best_epoch=best_epoch,
        device=hardware.describe(), seconds=time.perf_counter() - started,
        train_samples=n, augment_seconds=augment_seconds, history=history, temperature=temperature,
    )
