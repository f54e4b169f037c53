"""`digits worker`, `digits train`, and the worker half of `digits dev`."""

from __future__ import annotations

import argparse
import secrets
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from app.contracts import DigitsTrainJobV1
from app.observability import configure_logging
from config.settings import Settings, get_settings

if TYPE_CHECKING:
    from worker.train import Progress

# The first model `digits dev` trains: this many images, small batches (about 3 minutes on 2 cores).
FIRST_MODEL_LIMIT = 2000
FIRST_MODEL_BATCH = 64


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = sub.add_parser("worker", help="run an RQ worker on the training queue (with the scheduler)")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--name", default=None, help="worker name (default: RQ's)")
    worker.set_defaults(func=cmd_worker)

    defaults = DigitsTrainJobV1(request_id="defaults", user_id=0)
    train = sub.add_parser("train", help="train once here, with a progress bar; optionally upload the model")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=defaults.augment)
    train.add_argument("--limit", type=int, default=None, metavar="N", help="train on the first N images")
    train.add_argument("--model-id", default=defaults.model_id)
    train.add_argument("--out", type=Path, default=None, metavar="DIR", help="artifacts folder (DATA_DIR/artifacts)")
    train.add_argument("--upload", default=None, metavar="URL",
                       help="upload to URL/v1/admin/models/upload with HANDWRITING_API_KEY and activate it")
    train.set_defaults(func=cmd_train)


def cmd_worker(args: argparse.Namespace) -> int:
    from worker.rq_worker import run_worker

    settings = get_settings()
    configure_logging(settings.log_level)
    run_worker(settings, burst=args.burst, name=args.name)
    return 0


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


@dataclass
class ProgressBar:
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
        filled = round(self.width * p.pct / 100)
        bar = "#" * filled + "-" * (self.width - filled)
        self._line(f"epoch {p.epoch}/{p.total_epochs} batch {p.batch}/{p.total_batches} [{bar}] {p.pct:5.1f}% "
                   f"loss {p.loss:.4f} {p.samples_per_sec:,.0f} img/s ETA {_clock(p.eta_s)}",
                   end="\n" if p.batch == p.total_batches else "")


def cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

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


# --- digits dev: the worker beside the API, and a first model when none is active -------------------------


def dev_environment(env: dict[str, str], settings: Settings, api_url: str) -> dict[str, str]:
    """The API and the worker share an admin key (the configured one, from the environment or .env, or one
    made up for this run) and the API URL."""
    env = dict(env)
    key = settings.handwriting_api_key
    env["HANDWRITING_API_KEY"] = key.get_secret_value() if key is not None else secrets.token_urlsafe(24)
    env["HANDWRITING_API_URL"] = api_url
    return env


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env)


def active_model_exists(settings: Settings) -> bool:
    """Whether DATA_DIR already holds an active model (the API will serve it at start)."""
    from app.store import ModelStore

    return ModelStore(settings.models_dir, settings.api.keep_versions).active() is not None


def enqueue_first_model(redis_url: str) -> str:
    """Queue the first model's training. Small batches: a bootstrap run on a few thousand images still gets
    enough optimiser steps to read digits."""
    from app.deps import make_redis
    from app.queue import enqueue_train

    connection = make_redis(redis_url)
    assert connection is not None  # a URL was given
    job = DigitsTrainJobV1(request_id=f"dev-{uuid.uuid4().hex[:12]}", user_id=0, batch_size=FIRST_MODEL_BATCH,
                           notes="first model, digits dev")
    try:
        return enqueue_train(connection, get_settings().rq.queue, job)
    finally:
        connection.close()


@dataclass
class FirstModelWatch:
    """Follows one job's events on the channel (a daemon thread) and draws them as a progress bar."""

    redis_url: str
    channel: str
    job_id: str
    bar: ProgressBar = field(default_factory=ProgressBar)
    done: threading.Event = field(default_factory=threading.Event)
    succeeded: bool = False

    def start(self) -> FirstModelWatch:
        threading.Thread(target=self._run, name="digits-dev-follow", daemon=True).start()
        return self

    def _run(self) -> None:
        import redis

        from app.contracts import TrainCompletedV1, TrainFailedV1, TrainProgressV1, TrainStartedV1, parse_event
        from worker.train import Progress

        started = time.monotonic()
        client = redis.Redis.from_url(self.redis_url)
        pubsub = redis.client.PubSub(client.connection_pool, ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            while not self.done.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                try:
                    event = parse_event(message["data"])
                except ValueError:
                    continue
                if event.job_id != self.job_id:
                    continue
                if isinstance(event, TrainStartedV1):
                    started = time.monotonic()
                    self.bar.started(event.total_epochs or 1, event.device or "?")
                elif isinstance(event, TrainProgressV1):
                    elapsed = time.monotonic() - started
                    eta = elapsed * (100.0 - event.pct) / event.pct if event.pct > 0 else 0.0
                    self.bar.progress(Progress(
                        epoch=event.epoch, total_epochs=event.total_epochs, batch=event.batch,
                        total_batches=event.total_batches, loss=event.loss,
                        samples_per_sec=event.samples_per_sec, pct=event.pct, eta_s=eta,
                    ))
                elif isinstance(event, TrainCompletedV1):
                    state = "active now" if event.activated else "stored but not active"
                    print(f"\ndigits dev: first model ready ({state}): version {event.version}, "
                          f"val_acc {event.val_acc:.4f}, test_acc {event.test_acc:.4f}", flush=True)
                    self.succeeded = event.activated
                    self.done.set()
                elif isinstance(event, TrainFailedV1):
                    print(f"\ndigits dev: first model failed: {event.message}", flush=True)
                    self.done.set()
        except redis.RedisError:
            self.done.set()
        finally:
            pubsub.close()
            client.close()
