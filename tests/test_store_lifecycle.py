"""The store's lifecycle rules, with real processes where a rule is about several of them.

Retention orders by the time the server received a version and never prunes the version an upload
just stored, the active one, or the last one that passed the gate; a version's bytes are immutable
even when two API processes race to store it; a second API process starting leaves another's upload in
progress alone; a full disk answers 507 and leaves the store byte-identical; every version says when
it went live.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from app.contracts import WEIGHTS_FILE, ManifestV1_1
from app.store import INCOMING_STALE_S, ModelStore
from tests.serving_support import (
    API_KEY,
    MODEL_ID,
    install_model,
    manifest,
    store_snapshot,
    upload_files,
    weights_bytes,
)
from tests.support import LiveProcess, ServedApp, spawn, wait_until
from worker.cli.redis_embedded import free_port

KEY = {"X-Api-Key": API_KEY}


# --- the store itself ----------------------------------------------------------------------------------


def put(store: ModelStore, version: str, weights: bytes, *, created_at: str = "2026-01-01T00:00:00+00:00") -> None:
    incoming = store.new_incoming()
    (incoming / WEIGHTS_FILE).write_bytes(weights)
    doc = ManifestV1_1.model_validate_json(json.dumps(manifest(MODEL_ID, version, created_at=created_at)))
    store.commit(incoming, doc, hashlib.sha256(weights).hexdigest())


def test_retention_keeps_the_last_received_the_active_and_the_last_that_passed_the_gate(data_dir: Path) -> None:
    store = ModelStore(data_dir / "models", keep_versions=1)
    store.prepare()
    put(store, "passed", b"a")
    store.record_gate(MODEL_ID, "passed", "passed")
    put(store, "forced", b"b")
    store.set_active(MODEL_ID, "forced")
    store.record_gate(MODEL_ID, "forced", "forced")
    put(store, "refused", b"c")
    store.record_gate(MODEL_ID, "refused", "refused")
    put(store, "newest", b"d", created_at="2001-01-01T00:00:00+00:00")  # claims to be the oldest
    assert store.prune(MODEL_ID) == ["refused"]
    assert [v.version for v in store.versions(MODEL_ID)] == ["passed", "forced", "newest"]
    # Once a later version passes, the earlier one is only as safe as its age.
    store.record_gate(MODEL_ID, "newest", "passed")
    assert store.prune(MODEL_ID) == ["passed"]


def test_a_version_records_when_it_was_received_and_when_it_went_live(data_dir: Path) -> None:
    store = ModelStore(data_dir / "models")
    store.prepare()
    before = datetime.now().astimezone()
    put(store, "v1", b"a", created_at="2020-01-01T00:00:00+00:00")
    record = store.record(MODEL_ID, "v1")
    assert record.received_at >= before and record.activated_at is None
    store.set_active(MODEL_ID, "v1")
    went_live = store.record(MODEL_ID, "v1").activated_at
    assert went_live is not None and went_live >= record.received_at


def test_start_clears_stale_and_own_incoming_entries_but_not_another_process_upload(data_dir: Path) -> None:
    store = ModelStore(data_dir / "models")
    store.prepare()
    incoming = store.root / ".incoming"
    live = incoming / "otherhost_4242_0123"  # another API process's upload, in progress
    stale = incoming / "otherhost_4243_4567"  # ... and one a crash left hours ago
    for entry in (live, stale):
        entry.mkdir(parents=True)
        (entry / WEIGHTS_FILE).write_bytes(b"partial")
    old = time.time() - INCOMING_STALE_S - 60
    os.utime(stale, (old, old))
    own = store.new_incoming()  # this process's, from before a restart with the same host and pid
    ModelStore(store.root).prepare()
    assert sorted(p.name for p in incoming.iterdir()) == [live.name]
    assert not own.exists()


# --- through the real app ------------------------------------------------------------------------------


def post_upload(url: str, version: str, weights: bytes, created_at: str | None = None) -> httpx.Response:
    doc = manifest(version=version)
    if created_at is not None:
        doc["created_at"] = created_at
    data, files = upload_files(doc, weights, activate=False)
    return httpx.post(url + "/v1/admin/models/upload", data=data, files=files, headers=KEY, timeout=120)


def listed(url: str) -> list[str]:
    response = httpx.get(url + "/v1/admin/models", headers=KEY, timeout=30)
    return [v["version"] for v in response.json()["versions"]]


def test_retention_follows_the_order_received_not_the_uploaders_created_at(
    data_dir: Path, served_app: Callable[..., ServedApp]
) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, api={"keep_versions": 2, "model_poll_s": 0})
    # Written "in 2020": under the old rule it was pruned by the very request that stored it.
    old_claim = post_upload(api.url, "v2", weights_bytes(2), created_at="2020-01-01T00:00:00+00:00")
    assert old_claim.status_code == 200, old_claim.text
    assert listed(api.url) == ["v2", "v1"]
    assert post_upload(api.url, "v3", weights_bytes(3), created_at="2019-01-01T00:00:00+00:00").status_code == 200
    assert post_upload(api.url, "v4", weights_bytes(4), created_at="2018-01-01T00:00:00+00:00").status_code == 200
    # Received v2, v3, v4: v2 goes (the oldest received), v1 stays (active), whatever created_at says.
    assert listed(api.url) == ["v4", "v3", "v1"]


def test_the_active_model_and_the_versions_say_when_they_went_live(
    data_dir: Path, served_app: Callable[..., ServedApp]
) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    api = served_app(data_dir=data_dir, handwriting_api_key=API_KEY, api={"model_poll_s": 0})
    first = httpx.get(api.url + "/v1/models/active").json()
    assert first["version"] == "v1" and first["activated_at"] is not None
    data, files = upload_files(manifest(version="v2"), weights_bytes(2))
    assert httpx.post(api.url + "/v1/admin/models/upload", data=data, files=files, headers=KEY,
                      timeout=120).status_code == 200
    active = httpx.get(api.url + "/v1/models/active").json()
    assert active["version"] == "v2" and active["activated_at"] > first["activated_at"]
    versions = {v["version"]: v for v in httpx.get(api.url + "/v1/admin/models", headers=KEY).json()["versions"]}
    assert versions["v2"]["activated_at"] == active["activated_at"]
    assert versions["v2"]["received_at"] <= active["activated_at"]
    assert versions["v1"]["activated_at"] == first["activated_at"]  # when it last went live


# --- several API processes on one DATA_DIR ----------------------------------------------------------------


def start_api(data_dir: Path, log: Path, *, wrap: list[str] | None = None, env: dict[str, str] | None = None,
              ) -> tuple[LiveProcess, str]:
    """`uvicorn app.main:app` in its own process (optionally under `wrap`), serving DATA_DIR."""
    port = free_port()
    args = [*(wrap or []), sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1",
            "--port", str(port)]
    proc = spawn(args, {"DATA_DIR": str(data_dir), "HANDWRITING_API_KEY": API_KEY, "API__MODEL_POLL_S": "0",
                        "LOG_LEVEL": "WARNING", **(env or {})}, log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"the API exited:\n{proc.log()}")
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=120, what="the API process to start")
    return proc, url


@pytest.fixture
def processes() -> Iterator[list[LiveProcess]]:
    started: list[LiveProcess] = []
    yield started
    for proc in started:
        proc.stop()


class StoreLock:
    """The store's cross-process lock, held by this test as another API process mid-mutation would."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd: int | None = None

    def hold(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def store_lock(data_dir: Path) -> Iterator[StoreLock]:
    lock = StoreLock(data_dir / "models")
    yield lock
    lock.release()


def received(incoming: Path) -> int:
    """Uploads whose weights are written, waiting in .incoming."""
    return sum(1 for e in incoming.iterdir() if (e / WEIGHTS_FILE).is_file()) if incoming.is_dir() else 0


def test_two_processes_storing_one_version_with_different_bytes_one_wins_one_gets_409(
    data_dir: Path, tmp_path: Path, processes: list[LiveProcess], store_lock: StoreLock
) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    urls = []
    for name in ("a", "b"):
        proc, url = start_api(data_dir, tmp_path / f"api-{name}.log")
        processes.append(proc)
        urls.append(url)
    incoming = data_dir / "models" / ".incoming"
    store_lock.hold()  # both uploads get as far as storing, then race for the lock
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post_upload, url, "v2", weights_bytes(d)) for url, d in zip(urls, (2, 3), strict=True)]
        wait_until(lambda: received(incoming) == 2, timeout=120, what="both uploads to be received")
        store_lock.release()
        responses = sorted((f.result() for f in futures), key=lambda r: r.status_code)
    assert [r.status_code for r in responses] == [200, 409], [r.text for r in responses]
    assert responses[1].json()["code"] == "version_exists"
    digit = 2 if responses[0].json()["sha256"] == hashlib.sha256(weights_bytes(2)).hexdigest() else 3
    assert (data_dir / "models" / MODEL_ID / "v2" / WEIGHTS_FILE).read_bytes() == weights_bytes(digit)
    assert received(incoming) == 0


def test_a_second_api_starting_leaves_a_live_upload_of_another_alone(
    data_dir: Path, tmp_path: Path, processes: list[LiveProcess], store_lock: StoreLock,
    served_app: Callable[..., ServedApp],
) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    proc, url = start_api(data_dir, tmp_path / "api-a.log")
    processes.append(proc)
    incoming = data_dir / "models" / ".incoming"
    store_lock.hold()  # the upload is received and waits to be stored
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_upload, url, "v2", weights_bytes(2))
        wait_until(lambda: received(incoming) == 1, timeout=120, what="the upload to be received")
        # Another API process starts on the same DATA_DIR meanwhile (this one: another pid).
        served_app(data_dir=data_dir, handwriting_api_key=API_KEY, api={"model_poll_s": 0})
        assert received(incoming) == 1
        store_lock.release()
        response = pending.result()
    assert response.status_code == 200, response.text
    assert (data_dir / "models" / MODEL_ID / "v2" / WEIGHTS_FILE).read_bytes() == weights_bytes(2)


# --- a full disk ------------------------------------------------------------------------------------------


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                            capture_output=True, timeout=30)
    return result.returncode == 0


def test_a_full_disk_answers_507_and_leaves_the_store_as_it_was(
    data_dir: Path, tmp_path: Path, processes: list[LiveProcess]
) -> None:
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to give the API a small filesystem")
    seed = tmp_path / "seed"
    install_model(seed, "v1", forced_digit=1)
    models = data_dir / "models"
    models.mkdir()
    size_kib = len(weights_bytes(1)) * 3 // 2 // 1024  # room for one model and half of another
    # The API's models directory is a small tmpfs in a mount namespace of its own, seeded with v1.
    wrap = ["unshare", "-rm", "sh", "-c",
            f'mount -t tmpfs -o size={size_kib}k tmpfs "{models}" && cp -a "{seed}/models/." "{models}/" '
            '&& exec "$0" "$@"']
    proc, url = start_api(data_dir, tmp_path / "api.log", wrap=wrap)
    processes.append(proc)
    inside = Path(f"/proc/{proc.proc.pid}/root") / data_dir.relative_to("/")  # the API's view of DATA_DIR
    assert httpx.get(url + "/v1/models/active").json()["version"] == "v1"
    before = store_snapshot(inside)
    assert before and before == store_snapshot(seed)

    data, files = upload_files(manifest(version="v2"), weights_bytes(2))
    response = httpx.post(url + "/v1/admin/models/upload", data=data, files=files, headers=KEY, timeout=120)
    assert response.status_code == 507, response.text
    assert response.json()["code"] == "insufficient_storage"
    assert store_snapshot(inside) == before  # byte-identical: no half-written version, no temp file
    assert httpx.get(url + "/v1/models/active").json()["version"] == "v1"
    assert httpx.get(url + "/readyz").status_code == 200
