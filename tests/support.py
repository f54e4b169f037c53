"""Helpers for tests that run the real processes: the API under uvicorn on loopback, workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from worker.cli.redis_embedded import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LiveProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
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


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REDIS_URL", "RQ__", "DIGITS_", "HANDWRITING_", "DISCORD_", "DATA_DIR",
                                "TRAIN__", "API__"))}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> LiveProcess:
    log_file = log_path.open("wb")
    proc = subprocess.Popen(args, cwd=ROOT, env=clean_env(env), stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    return LiveProcess(proc=proc, log_path=log_path, env=env)


def start_api(env: dict[str, str], log_dir: Path, timeout: float = 60.0) -> LiveProcess:
    """uvicorn app.main:app on a free loopback port; returns once /healthz answers."""
    port = free_port()
    live = spawn(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        env,
        log_dir / f"api-{port}.log",
    )
    live.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.proc.poll() is not None:
            raise RuntimeError(f"API exited at start:\n{live.log()}")
        try:
            if httpx.get(live.url + "/healthz", timeout=1.0).status_code == 200:
                return live
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    live.stop()
    raise RuntimeError(f"API did not come up:\n{live.log()}")
