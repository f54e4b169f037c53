"""The `digits` command: one entry point for every process of the system."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from app.redis_embedded import EmbeddedRedis
from config.settings import get_settings
from worker.commands import add_commands


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _dev(args: argparse.Namespace) -> int:
    """Embedded Redis (unless REDIS_URL is set) + the API + a worker; a first model is trained when none
    is active. Ctrl-C stops everything."""
    from worker.commands import dev_environment, follow_job, start_worker, train_first_model_if_none

    settings = get_settings()
    embedded = None if settings.redis_url else EmbeddedRedis().start()
    env = dict(os.environ)
    if embedded is not None:
        env["REDIS_URL"] = embedded.url
        print(f"digits dev: embedded Redis on {embedded.url}", flush=True)
    api_url = f"http://{args.host}:{args.port}"
    env = dev_environment(env, api_url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "app.main:app", "--host", args.host, "--port", str(args.port),
             "--log-level", "warning", "--no-access-log"],
            env=env,
        ))
        print(f"digits dev: API on {api_url} (Ctrl-C stops everything)", flush=True)
        procs.append(start_worker(env))
        print(f"digits dev: training worker on queue {settings.rq.queue!r}", flush=True)
        first_job = train_first_model_if_none(api_url, env)
        if first_job is not None:
            follow_job(env["REDIS_URL"], settings.digits_events_channel, first_job)
            print(f"digits dev: no model is active; training the first one (job {first_job}, "
                  f"progress at {api_url}/v1/jobs/{first_job})", flush=True)
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                # A second SIGINT makes the RQ worker stop at once, ending a training in progress.
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if embedded is not None:
            embedded.stop()
        print("digits dev: stopped", flush=True)


def _discord_sync(args: argparse.Namespace) -> int:
    from app.discord.commands import run_discord_sync

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
