"""The newcomer path, end to end: clone, the README's run command, a first model, a correct read, Ctrl-C.

Slow (a fresh virtual environment and a real first training), so `make test` skips it and `.ci/run` runs it
with `make test-newcomer`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, clean_env
from worker.cli.redis_embedded import free_port

pytestmark = pytest.mark.newcomer

README = ROOT / "README.md"


def readme_commands() -> tuple[str, str]:
    """The two commands the README promises: run and test."""
    text = README.read_text()
    run = re.search(r"^(make run)\s", text, re.MULTILINE)
    test = re.search(r"^(make test)\s", text, re.MULTILINE)
    assert run and test, "the README names its run and test commands"
    return run.group(1), test.group(1)


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_under(path: Path) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def test_clone_run_read_and_stop(tmp_path: Path) -> None:
    run_command, _ = readme_commands()
    clone = tmp_path / "handwriting-ai"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    port = free_port()
    env = clean_env({
        "DATA_DIR": str(tmp_path / "data"),
        "DEV_ARGS": f"--port {port} --first-model-limit 2000",
        "LOG_LEVEL": "WARNING",
    })
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        # Its own process group, so the Ctrl-C below reaches make and everything under it, as a terminal's does.
        proc = subprocess.Popen(run_command.split(), cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20 * 60
        ready = False
        saw_training_503 = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(url + "/readyz", timeout=2)
                if r.status_code == 200:
                    ready = True
                    break
                saw_training_503 |= "training" in r.json().get("message", "")
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert ready, f"never ready; make run printed:\n{log_path.read_text(errors='replace')[-4000:]}"
        assert saw_training_503, "while the first model trained, /readyz said so"

        image = clone / "examples" / "digit-7.jpg"
        r = httpx.post(url + "/v1/read", files={"file": (image.name, image.read_bytes(), "image/jpeg")}, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["digit"] == 7, r.json()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("make run did not stop within 60 s of Ctrl-C")
    output = log_path.read_text(errors="replace")
    assert "digits dev: stopped" in output
    time.sleep(1)
    assert not listening(port), "the API still listens after Ctrl-C"
    assert processes_under(clone) == [], "processes left behind"
    redis_port = re.search(r"embedded Redis on redis://127\.0\.0\.1:(\d+)", output)
    assert redis_port and not listening(int(redis_port.group(1))), "the embedded Redis still listens"
