"""The default training job, timed: `python -m bench.train` (1 epoch, batch 256, lr 0.0015, seed 42, augment).

Prints the data preparation time (the preprocessed MNIST cache is built once, on the first run), the
training wall time, images/s, the share spent in augmentation, and val/test accuracy. Nothing is
uploaded; the artifacts go to a temporary folder unless --out is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from app.contracts import DigitsTrainJobV1
from config.settings import get_settings
from worker.artifacts import write_artifacts
from worker.data import load_mnist
from worker.train import Progress, pick_hardware, train


def main() -> None:
    defaults = DigitsTrainJobV1(request_id="bench", user_id=0)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment)
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images (quick looks)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    settings = get_settings()
    job = DigitsTrainJobV1(request_id="bench", user_id=0, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, seed=args.seed, augment=args.augment)
    hardware = pick_hardware(settings.train)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    print(f"job: epochs={job.epochs} batch_size={job.batch_size} lr={job.lr} seed={job.seed} augment={job.augment}")

    t0 = time.perf_counter()
    data = load_mnist(settings.cache_dir, val_size=settings.train.val_size, limit=args.limit,
                      workers=hardware.threads, on_status=print)
    data_s = time.perf_counter() - t0
    print(f"data ready in {data_s:.1f}s: train {len(data.train_x)}, val {len(data.val_x)}, test {len(data.test_x)}")

    def report(p: Progress) -> None:
        if p.batch % 20 == 0 or p.batch == p.total_batches:
            print(f"  epoch {p.epoch}/{p.total_epochs} batch {p.batch}/{p.total_batches} loss {p.loss:.4f} "
                  f"{p.samples_per_sec:.1f} img/s ETA {p.eta_s:.0f}s", flush=True)

    t1 = time.perf_counter()
    outcome = train(job, settings.train, data, hardware, on_progress=report)
    wall = time.perf_counter() - t1
    images = len(data.train_x) // min(job.batch_size, len(data.train_x)) * min(job.batch_size, len(data.train_x))
    train_only = sum(h["seconds"] for h in outcome.history)
    with tempfile.TemporaryDirectory() as tmp:
        art = write_artifacts(args.out or Path(tmp), job, outcome, {"bench": True})
        print(f"artifacts: {art.directory}" if args.out else "artifacts: (temporary)")

    print(f"device            {outcome.device}")
    print(f"wall (train+eval) {wall:.1f}s ({wall / 60:.2f} min); data prep {data_s:.1f}s")
    eval_s = sum(h["eval_seconds"] for h in outcome.history)
    print(f"images/s          {images * job.epochs / train_only:.1f} (training {train_only:.1f}s, "
          f"val eval {eval_s:.1f}s)")
    print(f"augmentation      {outcome.augment_seconds:.2f}s = {100 * outcome.augment_seconds / train_only:.1f}% "
          "of epoch time")
    print(f"val_acc           {outcome.val_acc:.4f} (best epoch {outcome.best_epoch})")
    print(f"test_acc          {outcome.test_acc:.4f}")


if __name__ == "__main__":
    main()
