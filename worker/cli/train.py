"""`digits train`: one training run here, with a progress bar; optionally upload the model."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from app.contracts import DigitsTrainJobV1
from app.observability import configure_logging
from config.settings import get_settings
from worker.hooks import RunHooks

if TYPE_CHECKING:
    from worker.train import Progress


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class ProgressBar(RunHooks):
    """One line on a terminal, redrawn in place: epoch, batch, loss, img/s, ETA."""

    stream: TextIO = field(default_factory=lambda: sys.stderr)
    width: int = 24
    _last_len: int = 0

    def _line(self, text: str, end: str = "") -> None:
        pad = max(0, self._last_len - len(text))
        self.stream.write("\r" + text + " " * pad + end)
        self.stream.flush()
        self._last_len = 0 if end else len(text)

    def stage(self, name: str) -> None:
        if name != "training":
            self._line(f"{name}...", end="\n")

    def started(self, total_epochs: int, device: str) -> None:
        self._line(f"training {total_epochs} epoch(s) on {device}", end="\n")

    def progress(self, p: Progress) -> None:
        self.draw(p.epoch, p.total_epochs, p.batch, p.total_batches, p.pct, p.loss, p.samples_per_sec, p.eta_s)

    def draw(self, epoch: int, total_epochs: int, batch: int, total_batches: int, pct: float, loss: float,
             samples_per_sec: float, eta_s: float) -> None:
        filled = round(self.width * pct / 100)
        bar = "#" * filled + "-" * (self.width - filled)
        self._line(f"epoch {epoch}/{total_epochs} batch {batch}/{total_batches} [{bar}] {pct:5.1f}% "
                   f"loss {loss:.4f} {samples_per_sec:,.0f} img/s ETA {_clock(eta_s)}",
                   end="\n" if batch == total_batches else "")


def add_train_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = DigitsTrainJobV1(request_id="defaults", user_id=0)
    train = sub.add_parser("train", help="train once here, with a progress bar; optionally upload the model")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment)
    train.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N images")
    train.add_argument("--model-id", default=defaults.model_id)
    train.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="artifacts folder (DATA_DIR/artifacts)")
    train.add_argument("--upload", default=None, metavar="URL",
                       help="upload to URL/v1/admin/models/upload with HANDWRITING_API_KEY and activate it")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    import app

    app.spin_while_training()  # before worker.job loads torch
    from worker.job import JobFailure, run_training

    settings = get_settings()
    configure_logging("WARNING")
    train_settings = settings.train.model_copy(update={"progress_every": 1, **(
        {"limit": args.limit} if args.limit is not None else {})})
    settings = settings.model_copy(update={"train": train_settings})
    try:
        job = DigitsTrainJobV1(
            request_id=f"cli-{uuid.uuid4().hex[:12]}", user_id=0, model_id=args.model_id, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment=args.augment, notes="digits train",
        )
    except ValidationError as exc:
        print(f"digits train: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        result = run_training(job, settings, ProgressBar(), out_dir=args.out, upload_url=args.upload,
                              upload=args.upload is not None)
    except JobFailure as failure:
        print(f"\ndigits train: failed: {failure.message}", file=sys.stderr)
        return 1
    print(f"val_acc {result.val_acc:.4f}  test_acc {result.test_acc:.4f}  train {result.train_seconds:.0f}s  "
          f"total {time.perf_counter() - started:.0f}s  on {result.device}")
    print(f"artifacts: {result.artifacts_dir}")
    if args.upload is not None:
        print("uploaded and activated" if result.activated else f"uploaded: {result.upload_note or 'not activated'}")
    return 0
