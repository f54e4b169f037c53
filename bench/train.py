"""Training throughput, today's network and the new one side by side: `python -m bench.train` (`make bench-train`).

For each arch and precision (fp32, and bf16 where the CPU has it natively; --bf16 forces it), runs the
real training loop (`worker.train.train`, the default job: batch 256, lr 0.0015, seed 42, augment) for
--warmup + --steps batches and times the --steps after the warm-up, then the evaluation pass. Prints
images/s, the default job's time extrapolated from them (1 epoch of 55,000 images = 214 batches, then
5,000 validation and 10,000 test images evaluated) and the new arch's speed-up, with the CPU beside
every figure. Each network trains as its job does: today's with one optimiser step per batch (as before
this round), the stride-2 ones with their arch's `views` (each batch learnt from 3 or 2 times, each under its
own augmentation) unless `TRAIN__BATCH_VIEWS` says otherwise.

    BENCH_TRAIN_FULL=1 make bench-train     # then also the whole default job for the new arch (or --full):
                                            # its wall time and test accuracy (the MNIST cache is built once)
"""

# ruff: noqa: E402  (torch must load after spin_while_training, as in the worker)
from __future__ import annotations

import app

app.spin_while_training()  # the worker's training threads wait at barriers as these do

import argparse
import os
import time
from dataclasses import dataclass

from app.contracts import DigitsTrainJobV1
from app.network import ARCHS, DEFAULT_ARCH, LEGACY_ARCH, cpu_has_fast_bf16
from bench.cpu import cpu_line, cpu_tag
from config.settings import TrainSettings, get_settings
from worker.data import load_mnist
from worker.train import Progress, batch_views, pick_hardware, train

DEFAULT_JOB = DigitsTrainJobV1(request_id="bench", user_id=0)
TRAIN_IMAGES = 55_000  # the default job's epoch: the 60k less the validation split
EVAL_IMAGES = 5_000 + 10_000  # validation after the epoch, test at the end


@dataclass(frozen=True)
class Throughput:
    arch: str
    precision: str
    device: str
    views: int  # optimiser steps per batch, as the run took them
    train_ips: float
    eval_ips: float

    def default_job_s(self) -> float:
        batches = TRAIN_IMAGES // DEFAULT_JOB.batch_size
        return batches * DEFAULT_JOB.batch_size / self.train_ips + EVAL_IMAGES / self.eval_ips


def measure(arch: str, precision: str, base: TrainSettings, warmup: int, steps: int) -> Throughput:
    """Images/s of the real loop at the default batch, after `warmup` batches; and of the evaluation pass."""
    settings = base.model_copy(update={"arch": arch, "precision": precision, "progress_every": 1})
    hardware = pick_hardware(settings)
    limit = (warmup + steps) * DEFAULT_JOB.batch_size
    data = load_mnist(get_settings().cache_dir, val_size=settings.val_size, limit=limit, workers=hardware.threads)
    ends: list[float] = []

    def stamp(_: Progress) -> None:
        ends.append(time.perf_counter())

    outcome = train(DEFAULT_JOB, settings, data, hardware, on_progress=stamp)
    train_ips = steps * DEFAULT_JOB.batch_size / (ends[-1] - ends[warmup - 1])
    eval_ips = len(data.val_x) / outcome.history[0]["eval_seconds"]
    return Throughput(arch, precision, outcome.device, batch_views(settings), train_ips, eval_ips)


def full_job(arch: str, base: TrainSettings) -> None:
    """The whole default job, as the worker runs it: wall time and accuracy."""
    settings = base.model_copy(update={"arch": arch})
    hardware = pick_hardware(settings)
    started = time.perf_counter()
    data = load_mnist(get_settings().cache_dir, val_size=settings.val_size, workers=hardware.threads, on_status=print)
    data_s = time.perf_counter() - started

    def report(p: Progress) -> None:
        if p.batch % 20 == 0 or p.batch == p.total_batches:
            print(f"  batch {p.batch}/{p.total_batches} loss {p.loss:.4f} {p.samples_per_sec:.1f} img/s "
                  f"ETA {p.eta_s:.0f}s", flush=True)

    print(f"\nthe default job, {arch} (data ready in {data_s:.1f}s: train {len(data.train_x)}, val "
          f"{len(data.val_x)}, test {len(data.test_x)})", flush=True)
    t0 = time.perf_counter()
    outcome = train(DEFAULT_JOB, settings, data, hardware, on_progress=report)
    wall = time.perf_counter() - t0
    train_s = sum(h["seconds"] for h in outcome.history)
    print(f"{arch} default job on {outcome.device}: {wall:.1f}s ({wall / 60:.2f} min; training {train_s:.1f}s at "
          f"{len(data.train_x) // DEFAULT_JOB.batch_size * DEFAULT_JOB.batch_size / train_s:.1f} img/s); "
          f"val_acc {outcome.val_acc:.4f}, test_acc {outcome.test_acc:.4f} (seed {DEFAULT_JOB.seed})  {cpu_tag()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="timed batches per arch and precision")
    parser.add_argument("--warmup", type=int, default=1, help="batches before the timing starts (at least 1)")
    parser.add_argument("--arch", nargs="+", default=[LEGACY_ARCH, DEFAULT_ARCH], choices=sorted(ARCHS))
    parser.add_argument("--bf16", action="store_true", help="time bf16 even where it is not native")
    parser.add_argument("--full", action="store_true", default=os.environ.get("BENCH_TRAIN_FULL") == "1",
                        help="then run the whole default job for the new arch (BENCH_TRAIN_FULL=1)")
    args = parser.parse_args()
    base = get_settings().train
    precisions = ["fp32", "bf16"] if args.bf16 or cpu_has_fast_bf16() else ["fp32"]
    tag = cpu_tag()
    print(cpu_line())
    print(f"OpenMP threads wait: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}")
    print(f"default job: batch {DEFAULT_JOB.batch_size}, lr {DEFAULT_JOB.lr}, seed {DEFAULT_JOB.seed}, augment "
          f"{DEFAULT_JOB.augment}; {args.warmup} warm-up + {args.steps} timed batches per row", flush=True)
    rows: list[Throughput] = []
    for precision in precisions:
        for arch in args.arch:
            rows.append(measure(arch, precision, base, max(1, args.warmup), args.steps))
            row = rows[-1]
            job_s = row.default_job_s()
            print(f"{arch:<15}{precision:<6}{row.views} view(s){row.train_ips:>8.1f} img/s train "
                  f"{row.eval_ips:>8.1f} img/s eval  "
                  f"default job ~{job_s / 60:.1f} min  {row.device}  {tag}", flush=True)
    for precision in precisions:
        same = {row.arch: row for row in rows if row.precision == precision}
        if len(args.arch) > 1:
            old, new = same[args.arch[0]], same[args.arch[-1]]
            print(f"{precision}: {new.arch} trains {new.train_ips / old.train_ips:.1f}x faster than {old.arch}; "
                  f"default job {old.default_job_s() / new.default_job_s():.1f}x  {tag}")
    if args.full:
        full_job(args.arch[-1], base)


if __name__ == "__main__":
    main()
