"""The `digits` command: one entry point for every process of the system.

    digits serve         the API (same as `uvicorn app.main:app`)
    digits worker        an RQ worker on the training queue, with the scheduler (retries need it)
    digits train         one training run here, with a progress bar (worker/cli/train.py)
    digits dev           embedded Redis + API + worker, a first model trained if none exists (worker/cli/dev.py)
    digits discord-sync  register the slash commands with Discord
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.observability import configure_logging
from config.settings import get_settings
from worker.cli.dev import FIRST_MODEL_LIMIT, SHUTDOWN_GRACE_S, run_dev
from worker.cli.train import add_train_command


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run("app.main:app", host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


def _worker(args: argparse.Namespace) -> int:
    import app
    from worker.rq_worker import run_worker

    app.spin_while_training()  # torch loads in each job's work horse, after this

    settings = get_settings()
    configure_logging(settings.log_level)
    run_worker(settings, burst=args.burst, name=args.name)
    return 0


def _discord_sync(args: argparse.Namespace) -> int:
    """Exit status 0 when registered, 1 with a readable reason otherwise."""
    from app.discord.registration import SyncError, sync_commands

    settings = get_settings()
    token = settings.discord_bot_token.get_secret_value() if settings.discord_bot_token else None
    try:
        report = sync_commands(api_base=settings.discord_api_base, application_id=settings.discord_application_id,
                               bot_token=token, guild_id=args.guild)
    except SyncError as exc:
        print(f"discord-sync: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digits", description="handwriting-ai: read and train digits")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API (same as `uvicorn app.main:app`)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run an RQ worker on the training queue (with the scheduler)")
    worker.add_argument("--burst", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--name", default=None, help="worker name (default: RQ's)")
    worker.set_defaults(func=_worker)

    add_train_command(sub)

    dev = sub.add_parser("dev", help="embedded Redis + API + worker, a first model trained if none exists")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--first-model-limit", type=int, default=FIRST_MODEL_LIMIT, metavar="N",
                     help=f"train the first model on N images (default {FIRST_MODEL_LIMIT}; 0: all 55,000, "
                     "about an hour on 2 cores)")
    dev.set_defaults(func=run_dev)

    sync = sub.add_parser("discord-sync", help="register the slash commands with Discord (bulk overwrite)")
    sync.add_argument("--guild", metavar="ID", default=None, help="one guild (updates at once) instead of global")
    sync.set_defaults(func=_discord_sync)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code
