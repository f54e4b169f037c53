"""API replicas share only Redis: what one replica activates, every replica serves.

Each replica is a real API process (uvicorn) with its own DATA_DIR, all meeting in one real Redis,
as two Railway replicas with a volume each (or none) would.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from app.replication import ACTIVE_KEY, BLOB_PREFIX, PUBLISHED_KEY, SharedPointer
from tests.serving_support import API_KEY, MODEL_ID, digit_png, manifest, store_snapshot, upload_files, weights_bytes
from tests.support import LiveProcess, spawn, wait_until
from worker.cli.redis_embedded import EmbeddedRedis, free_port

KEY = {"X-Api-Key": API_KEY}
PNG = digit_png()
CONVERGE_S = 10.0  # the promise: an activation on one replica is served by all within 10 s


@dataclass
class Replica:
    live: LiveProcess
    url: str
    data_dir: Path

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30)

    def post(self, path: str) -> httpx.Response:
        return httpx.post(self.url + path, headers=KEY, timeout=60)

    def upload(self, version: str, digit: int) -> httpx.Response:
        data, files = upload_files(manifest(version=version), weights_bytes(digit))
        response = httpx.post(self.url + "/v1/admin/models/upload", data=data, files=files, headers=KEY, timeout=60)
        assert response.status_code == 200, response.text
        return response

    def served(self) -> tuple[str | None, str | None]:
        """(version, weights_sha256) of the model this replica serves."""
        body = self.get("/v1/models/active").json()
        return body.get("version"), body.get("weights_sha256")

    def read(self) -> tuple[int, str]:
        response = httpx.post(self.url + "/v1/read", files={"file": ("d.png", PNG, "image/png")}, timeout=30)
        assert response.status_code == 200, response.text
        return int(response.json()["digit"]), str(response.json()["version"])

    def events(self, event: str) -> float:
        text = self.get("/metrics").text
        found = re.search(rf'^model_replication_events_total{{event="{event}"}} (\S+)$', text, re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def wait_serving(self, version: str, timeout: float = CONVERGE_S) -> None:
        def serving() -> bool:
            try:
                return self.served()[0] == version
            except httpx.TransportError:  # not listening yet
                return False
        wait_until(serving, timeout=timeout,
                   what=f"{self.url} to serve {version}\n{self.live.log()[-3000:]}")


StartReplica = Callable[..., Replica]


@pytest.fixture
def start_replica(tmp_path: Path) -> Iterator[StartReplica]:
    """`start_replica(name, redis_url)` runs `uvicorn app.main:app` with DATA_DIR tmp_path/name; all stop after."""
    started: list[Replica] = []

    def start(name: str, redis_url: str) -> Replica:
        data_dir = tmp_path / name
        data_dir.mkdir(exist_ok=True)
        port = free_port()
        env = {"REDIS_URL": redis_url, "DATA_DIR": str(data_dir), "HANDWRITING_API_KEY": API_KEY,
               "API__TORCH_THREADS": "1", "LOG_LEVEL": "INFO"}
        live = spawn([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)],
                     env, tmp_path / f"{name}-{time.monotonic_ns()}.log")
        replica = Replica(live, f"http://127.0.0.1:{port}", data_dir)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.live.stop()


def wait_up(*replicas: Replica) -> None:
    for replica in replicas:
        def healthy(r: Replica = replica) -> bool:
            assert r.live.proc.poll() is None, f"the API exited:\n{r.live.log()[-3000:]}"
            try:
                return r.get("/healthz").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(healthy, timeout=120, what="the API to start")


def blobs_in_redis(url: str) -> set[str]:
    with redis.Redis.from_url(url) as client:
        return {key.decode().removeprefix(BLOB_PREFIX) for key in client.keys(BLOB_PREFIX + "*")}


def test_an_activation_on_either_replica_is_served_by_both(start_replica: StartReplica, redis_url: str) -> None:
    a, b = start_replica("a", redis_url), start_replica("b", redis_url)
    wait_up(a, b)
    assert b.get("/readyz").status_code == 503

    sha1 = a.upload("v1", digit=1).json()["sha256"]
    b.wait_serving("v1")
    assert b.read() == (1, "v1")
    assert b.served() == ("v1", sha1)  # the hash published with the bytes, checked on receipt
    assert a.events("published") == 1 and b.events("received") == 1
    assert 'active_model_info{model_id="mnist_resnet18_v1",version="v1"} 1.0' in b.get("/metrics").text

    b.upload("v2", digit=2)  # the other way round
    a.wait_serving("v2")
    assert a.read() == (2, "v2")

    a.upload("v3", digit=3)
    b.wait_serving("v3")
    # Redis holds the weights of the active version and the previous one (API__REPLICATE_KEEP=2), no more.
    assert blobs_in_redis(redis_url) == {f"{MODEL_ID}/v3", f"{MODEL_ID}/v2"}

    # A rollback to a version Redis no longer holds: the replica that has it publishes it again.
    assert b.post(f"/v1/admin/models/{MODEL_ID}/versions/v1/activate").status_code == 200
    a.wait_serving("v1")
    assert a.read() == (1, "v1") and b.read() == (1, "v1")
    assert blobs_in_redis(redis_url) == {f"{MODEL_ID}/v1", f"{MODEL_ID}/v3"}
    with redis.Redis.from_url(redis_url) as client:
        assert client.lrange(PUBLISHED_KEY, 0, -1) == [f"{MODEL_ID}/v1".encode(), f"{MODEL_ID}/v3".encode()]


def test_a_replica_started_with_an_empty_data_dir_serves_the_active_model(
    start_replica: StartReplica, redis_url: str, tmp_path: Path
) -> None:
    a = start_replica("a", redis_url)
    wait_up(a)
    a.upload("v1", digit=1)
    a.upload("v2", digit=2)

    fresh = start_replica("fresh", redis_url)
    wait_up(fresh)  # the process is up (importing torch is not the replica's to speed up) ...
    fresh.wait_serving("v2", timeout=30)  # ... and serves the active model within 30 s
    assert fresh.read() == (2, "v2")
    # It stored the version through its own store, so a restart with that volume serves it even without Redis.
    assert (fresh.data_dir / "models" / MODEL_ID / "v2" / "model.pt").read_bytes() == weights_bytes(2)
    # And its promotion gate gets ready for the next candidate: its own set built, the served model scored.
    wait_until(lambda: "model_gate_ready 1.0" in fresh.get("/metrics").text, timeout=60,
               what=f"the fresh replica's gate to get ready\n{fresh.live.log()[-3000:]}")
    assert list((fresh.data_dir / "gate").glob("gate-*.npz"))

    # A rollback landing on it, to the previous version it never held: Redis keeps the previous one for that.
    assert fresh.post(f"/v1/admin/models/{MODEL_ID}/versions/v1/activate").status_code == 200
    assert fresh.read() == (1, "v1")
    a.wait_serving("v1")
    assert fresh.post(f"/v1/admin/models/{MODEL_ID}/versions/v0/activate").status_code == 404


def test_weights_changed_in_redis_are_refused(start_replica: StartReplica, redis_url: str) -> None:
    a = start_replica("a", redis_url)
    wait_up(a)
    a.upload("v1", digit=1)
    with redis.Redis.from_url(redis_url) as client:
        key = BLOB_PREFIX + f"{MODEL_ID}/v1"
        weights = client.hget(key, "weights")
        assert isinstance(weights, bytes)
        middle = len(weights) // 2
        client.hset(key, "weights", weights[:middle] + bytes([weights[middle] ^ 0xFF]) + weights[middle + 1:])

    b = start_replica("b", redis_url)
    wait_up(b)
    wait_until(lambda: b.events("refused") >= 1, timeout=30, what="the tampered blob to be refused")
    assert b.get("/readyz").status_code == 503  # it serves nothing rather than unchecked bytes
    assert not any(name.endswith("model.pt") for name in store_snapshot(b.data_dir))
    assert "hash to" in b.live.log()

    a.upload("v2", digit=2)  # a sound version is then followed as usual
    b.wait_serving("v2")
    assert b.read() == (2, "v2")


def test_reads_survive_a_redis_outage_and_replicas_reconverge_after_it(
    start_replica: StartReplica, tmp_path: Path
) -> None:
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    try:
        a, b = start_replica("a", server.url), start_replica("b", server.url)
        wait_up(a, b)
        a.upload("v1", digit=1)
        b.wait_serving("v1")

        server.stop()
        assert b.read() == (1, "v1")
        assert a.upload("v2", digit=2).json()["activated"] is True  # activated here, published once Redis is back
        assert a.read() == (2, "v2") and b.read() == (1, "v1")

        server = EmbeddedRedis(port=port).start()  # back, and empty
        b.wait_serving("v2", timeout=CONVERGE_S + 10)  # reconnecting may take one back-off first
        assert b.read() == (2, "v2")
        with redis.Redis.from_url(server.url) as client:
            raw = client.get(ACTIVE_KEY)
            assert isinstance(raw, bytes) and SharedPointer.model_validate_json(raw).version == "v2"
    finally:
        server.stop()
