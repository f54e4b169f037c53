"""Helpers for tests that run the real parts: the real app served over HTTP on loopback, child processes
(workers, `make run`), and waiting for something to happen."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import uvicorn
from fastapi import FastAPI

from config.settings import Settings
from worker.cli.redis_embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Signs(Protocol):
    def sign(self, body: bytes, timestamp: str | None = None) -> dict[str, str]: ...


@dataclass
class ServedApp:
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def post(self, signer: Signs, payload: dict[str, Any] | bytes, **kwargs: Any) -> httpx.Response:
        """A Discord interaction, signed as Discord signs it."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return httpx.post(self.url + "/discord/interactions", content=body, headers=signer.sign(body), timeout=10,
                          **kwargs)

    def stop(self) -> None:
        """Shut down as uvicorn does on Ctrl-C (the app's lifespan ends); fails if it does not."""
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the app did not shut down"


def serve(settings: Settings) -> ServedApp:
    """The real app (`create_app`) under uvicorn on a loopback port, in a thread of this process."""
    from app.main import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=60, what="the app to start")
    if not server.started:
        raise RuntimeError("the app did not start")
    return ServedApp(f"http://127.0.0.1:{port}", app, server, thread)


@dataclass
class LiveProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# The promotion gate's set in test servers (the default is 1,000): every server that serves a model builds
# it in the background, and tests train on small subsets too. Tests of the gate choose their own size.
TEST_GATE_SIZE = 50


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS", "RQ__", "DIGITS_", "HANDWRITING_", "DISCORD_", "DATA_DIR",
                                "TRAIN__", "API__"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "API__GATE_SIZE": str(TEST_GATE_SIZE)})
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> LiveProcess:
    log_file = log_path.open("wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=clean_env(env), stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    return LiveProcess(proc=proc, log_path=log_path, env=env)
