"""The `digits` command: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from app.redis_embedded import EmbeddedRedis
from config.settings import get_settings
from worker.commands import FIRST_MODEL_LIMIT, add_commands


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _dev(args: argparse.Namespace) -> int:
    """Embedded Redis (unless REDIS_URL is set) + the API + a worker; a first model is trained when none is
    active, with its progress drawn here. Ctrl-C stops everything."""
    from worker.commands import (
        FirstModelWatch,
        active_model_exists,
        dev_environment,
        enqueue_first_model,
        start_worker,
    )

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

    first_model = not active_model_exists(settings)
    # The first model trains on a few thousand images so it is ready in minutes; later jobs use everything.
    limited = first_model and args.first_model_limit > 0 and "TRAIN__LIMIT" not in os.environ
    worker_env = {**env, "TRAIN__LIMIT": str(args.first_model_limit)} if limited else env
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", args.host, "--port", str(args.port),
         "--log-level", "warning", "--no-access-log"],
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
            job_id = enqueue_first_model(redis_url)
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


def _wait_healthy(api_url: str, api: subprocess.Popen[bytes], stop: threading.Event, timeout_s: float) -> bool:
    import httpx

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


def _discord_sync(args: argparse.Namespace) -> int:
    from app.discord.registration import run_discord_sync

    guild: str | None = args.guild
    return run_discord_sync(guild)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digits", description="handwriting-ai: read and train digits")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API (same as `uvicorn app.main:app`)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    dev = sub.add_parser("dev", help="embedded Redis + API + worker, a first model trained if none exists")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--first-model-limit", type=int, default=FIRST_MODEL_LIMIT, metavar="N",
                     help=f"train the first model on N images (default {FIRST_MODEL_LIMIT}; 0: all 55,000, "
                     "about an hour on 2 cores)")
    dev.set_defaults(func=_dev)

    sync = sub.add_parser("discord-sync", help="register the slash commands with Discord (bulk overwrite)")
    sync.add_argument("--guild", metavar="ID", default=None, help="one guild (updates at once) instead of global")
    sync.set_defaults(func=_discord_sync)

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
