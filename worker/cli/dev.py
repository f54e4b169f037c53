"""`digits dev`: embedded Redis (unless REDIS_URL is set), the API and a worker; a first model is trained when
none is active, with its progress drawn here. Ctrl-C stops everything."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import httpx
import redis

import app
from app.contracts import (
    DigitsTrainJobV1,
    TrainCompletedV1,
    TrainFailedV1,
    TrainProgressV1,
    TrainStartedV1,
    parse_event,
)
from app.queue import enqueue_train
from app.store import ModelStore
from config.settings import Settings, TrainSettings, get_settings
from worker.cli.redis_embedded import EmbeddedRedis
from worker.cli.train import ProgressBar

# The first model `digits dev` trains: this many images, small batches (about 3 minutes on 2 cores).
FIRST_MODEL_LIMIT = 2000
# An open event stream (the page following a job) ends the job's stream only when the job ends; uvicorn
# would wait for it on Ctrl-C or a redeploy, so the API gets this long to finish in-flight requests.
SHUTDOWN_GRACE_S = 5
FIRST_MODEL_BATCH = 64


def run_dev(args: argparse.Namespace) -> int:
    settings = get_settings()
    embedded = None if settings.redis_url else EmbeddedRedis().start()
    redis_url = settings.redis_url or (embedded.url if embedded is not None else "")
    api_url = f"http://{args.host}:{args.port}"
    env = dev_environment(dict(os.environ), settings, api_url)
    env["REDIS_URL"] = redis_url
    env.setdefault("LOG_LEVEL", "WARNING")  # the console is for the progress bar and real problems
    if embedded is not None:
        print(f"digits dev: embedded Redis on {embedded.url}", flush=True)
    if settings.handwriting_api_key is None:
        print(f"digits dev: admin key for this run: {env['HANDWRITING_API_KEY']} "
              "(set HANDWRITING_API_KEY in .env to choose your own)", flush=True)

    first_model = ModelStore(settings.models_dir, settings.api.keep_versions).active() is None
    # The first model trains on a few thousand images so it is ready in minutes; later jobs use everything.
    limited = first_model and args.first_model_limit > 0 and "TRAIN__LIMIT" not in os.environ
    worker_env = {**env, "TRAIN__LIMIT": str(args.first_model_limit)} if limited else env
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", args.host, "--port", str(args.port),
         "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", str(SHUTDOWN_GRACE_S)],
        env=env,
    )
    worker = start_worker(worker_env)
    watch: FirstModelWatch | None = None
    # Ctrl-C reaches the whole process group at once: remember that it was asked, so children exiting
    # first are not reported as a crash.
    interrupted = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    signal.signal(signal.SIGTERM, lambda *_: interrupted.set())
    try:
        if not _wait_healthy(api_url, api, interrupted, timeout_s=180):
            if interrupted.is_set():
                return 0
            print(f"digits dev: the API did not come up on {api_url}", file=sys.stderr, flush=True)
            return 1
        print(f"digits dev: API on {api_url}, worker on queue {settings.rq.queue!r} (Ctrl-C stops everything)",
              flush=True)
        if first_model:
            job_id = enqueue_first_model(redis_url, settings.rq.queue, settings.train)
            size = f"the first {args.first_model_limit} images" if limited else "TRAIN__LIMIT images or all"
            print(f"digits dev: no model yet; training the first one on {size} (job {job_id}). "
                  f"Until it is ready /v1/read answers 503 with its progress.", flush=True)
            watch = FirstModelWatch(redis_url, settings.digits_events_channel, job_id).start()
        while api.poll() is None and worker.poll() is None and not interrupted.is_set():
            if limited and watch is not None and watch.done.is_set():
                _stop(worker, hurry=True)
                worker = start_worker(env)
                limited = False
            interrupted.wait(0.5)
        if interrupted.is_set():
            return 0
        which = "the API" if api.poll() is not None else "the worker"
        print(f"digits dev: {which} exited; stopping the rest", file=sys.stderr, flush=True)
        return 1
    finally:
        _stop(worker, signalled=interrupted.is_set(), hurry=True)
        _stop(api, signalled=interrupted.is_set())
        if embedded is not None:
            embedded.stop()
        print("digits dev: stopped", flush=True)


def dev_environment(env: dict[str, str], settings: Settings, api_url: str) -> dict[str, str]:
    """The API and the worker share an admin key (the configured one, from the environment or .env, or one
    made up for this run) and the API URL; each picks its own OpenMP wait policy unless the user chose one."""
    env = dict(env)
    if not app.WAIT_POLICY_GIVEN:  # our API default, not the user's: the worker's training threads spin
        env.pop("OMP_WAIT_POLICY", None)
    key = settings.handwriting_api_key
    env["HANDWRITING_API_KEY"] = key.get_secret_value() if key is not None else secrets.token_urlsafe(24)
    env["HANDWRITING_API_URL"] = api_url
    return env


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env)


def enqueue_first_model(redis_url: str, queue_name: str, train: TrainSettings) -> str:
    """Queue the first model's training. Small batches: a bootstrap run on a few thousand images still gets
    enough optimiser steps to read digits."""
    job = DigitsTrainJobV1(request_id=f"dev-{uuid.uuid4().hex[:12]}", user_id=0, batch_size=FIRST_MODEL_BATCH,
                           notes="first model, digits dev")
    connection = redis.Redis.from_url(redis_url)
    try:
        return enqueue_train(connection, queue_name, job, train=train)
    finally:
        connection.close()


def _wait_healthy(api_url: str, api: subprocess.Popen[bytes], stop: threading.Event, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and api.poll() is None and not stop.is_set():
        try:
            if httpx.get(api_url + "/healthz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        stop.wait(0.3)
    return False


def _stop(proc: subprocess.Popen[bytes], *, signalled: bool = False, hurry: bool = False) -> None:
    """End a child gracefully: SIGINT (unless Ctrl-C already delivered it to the group); with `hurry`, a second
    SIGINT a second later if it still runs (RQ's cue to end a job in progress at once); kill after 15 s."""
    if not signalled and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    if hurry:
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
                    self.bar.draw(event.epoch, event.total_epochs, event.batch, event.total_batches, event.pct,
                                  event.loss, event.samples_per_sec, eta)
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
