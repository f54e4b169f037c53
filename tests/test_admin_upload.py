"""Admin upload, listing and rollback, through the real app with real ResNet-18 weights.

Every refusal leaves the store byte-identical and the served model answering as before; the
hot swap under load and the restart run against a live uvicorn server.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import torch

from app.store import ModelStore
from tests.serving_support import (
    API_KEY,
    MODEL_ID,
    digit_png,
    install_model,
    make_settings,
    manifest,
    model_state,
    running_app,
    store_snapshot,
    upload,
    upload_files,
    weights_bytes,
)
from tests.support import ServedApp

pytestmark = pytest.mark.anyio

PNG = digit_png()
KEY = {"X-Api-Key": API_KEY}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


async def read_digit(client: httpx.AsyncClient) -> tuple[int, str]:
    response = await client.post("/v1/read", files={"file": ("d.png", PNG, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["digit"], response.json()["version"]


def torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class RunsCode:
    """A pickle payload: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# --- refusals: one app, each refusal must leave it exactly as it was ----------------------------------


@dataclass
class Refused:
    data_dir: Path
    client: httpx.AsyncClient


@pytest.fixture(scope="module")
async def refused(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Refused]:
    data_dir = tmp_path_factory.mktemp("admin-refusals")
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir, manifest_max_bytes=64 * 1024)) as client:
        yield Refused(data_dir, client)


def _nan_weights() -> bytes:
    state = model_state(4)
    state["conv1.weight"] = torch.full_like(state["conv1.weight"], float("nan"))
    return torch_bytes(state)


def _wrong_head() -> bytes:
    state = model_state()
    state["fc.weight"] = torch.zeros(5, 512)
    state["fc.bias"] = torch.zeros(5)
    return torch_bytes(state)


REAL = weights_bytes(4)
Doc = dict[str, object] | bytes


@dataclass(frozen=True)
class Refusal:
    doc: Callable[[], Doc]
    weights: Callable[[], bytes]
    status: int
    code: str
    model_id: str = MODEL_ID
    key: str | None = API_KEY


def real() -> bytes:
    return REAL


def doc(**overrides: object) -> Callable[[], Doc]:
    return lambda: {**manifest(version="x"), **overrides}


REFUSALS: dict[str, Refusal] = {
    "wrong key": Refusal(doc(), real, 401, "unauthorized", key="wrong"),
    "no key": Refusal(doc(), real, 401, "unauthorized", key=None),
    "empty key": Refusal(doc(), real, 401, "unauthorized", key=""),
    "manifest not json": Refusal(lambda: b"{not json", real, 400, "invalid_manifest"),
    "manifest a list": Refusal(lambda: b"[1, 2]", real, 400, "invalid_manifest"),
    "manifest incomplete": Refusal(lambda: {"schema_version": "v1.1", "model_id": MODEL_ID}, real, 400,
                                   "invalid_manifest"),
    "manifest bad types": Refusal(doc(val_acc="high"), real, 400, "invalid_manifest"),
    "schema v1.0": Refusal(doc(schema_version="v1.0"), real, 400, "unsupported_schema_version"),
    "schema missing": Refusal(lambda: {k: v for k, v in manifest(version="x").items() if k != "schema_version"},
                              real, 400, "unsupported_schema_version"),
    "other preprocessing": Refusal(doc(preprocess_hash="0" * 64), real, 400, "preprocess_mismatch"),
    "model_id differs": Refusal(doc(), real, 400, "model_id_mismatch", model_id="another_model"),
    "model_id ../x": Refusal(doc(), real, 400, "invalid_model_id", model_id="../x"),
    "model_id a/b": Refusal(doc(), real, 400, "invalid_model_id", model_id="a/b"),
    "model_id empty": Refusal(doc(), real, 400, "invalid_model_id", model_id=""),
    "model_id too long": Refusal(doc(), real, 400, "invalid_model_id", model_id="m" * 65),
    "model_id upper case": Refusal(doc(), real, 400, "invalid_model_id", model_id="Mnist"),
    "checksum differs": Refusal(doc(weights_sha256="0" * 64), real, 400, "checksum_mismatch"),
    "weights empty": Refusal(doc(), lambda: b"", 400, "invalid_weights"),
    "weights garbage": Refusal(doc(), lambda: os.urandom(4096), 400, "invalid_weights"),
    "weights not a state dict": Refusal(doc(), lambda: torch_bytes([1, 2, 3]), 400, "invalid_weights"),
    "weights of another net": Refusal(doc(), lambda: torch_bytes({"weight": torch.zeros(3, 3)}), 400,
                                      "weights_mismatch"),
    "weights with a 5-class head": Refusal(doc(), _wrong_head, 400, "weights_mismatch"),
    "arch not served": Refusal(doc(arch="vit_tiny"), real, 400, "unsupported_arch"),
    "smoke prediction fails": Refusal(doc(), _nan_weights, 400, "smoke_test_failed"),
    "manifest over 64 KiB": Refusal(doc(padding="p" * 70_000), real, 413, "too_large"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_refused_upload_changes_nothing(refused: Refused, case: str) -> None:
    refusal = REFUSALS[case]
    before = store_snapshot(refused.data_dir)
    response = await upload(refused.client, refusal.doc(), refusal.weights(), model_id=refusal.model_id,
                            key=refusal.key)
    assert response.status_code == refusal.status, response.text
    body = response.json()
    assert body["code"] == refusal.code and body["message"] and body["request_id"]
    assert store_snapshot(refused.data_dir) == before
    assert await read_digit(refused.client) == (1, "v1")


@pytest.mark.parametrize("form", ["torch.save zip", "plain pickle"])
async def test_a_pickle_that_runs_code_is_refused_without_running_it(
    refused: Refused, tmp_path: Path, form: str
) -> None:
    marker = tmp_path / "pwned"
    payload = {"conv1.weight": RunsCode(marker)}
    evil = torch_bytes(payload) if form == "torch.save zip" else pickle.dumps(payload, protocol=2)
    before = store_snapshot(refused.data_dir)
    response = await upload(refused.client, manifest(version="evil"), evil)
    assert response.status_code == 400 and response.json()["code"] == "invalid_weights", response.text
    assert "weights_only" in response.json()["message"]
    assert not marker.exists()
    assert store_snapshot(refused.data_dir) == before
    assert await read_digit(refused.client) == (1, "v1")
    # The payload is live: a plain unpickle would have run it.
    pickle.loads(pickle.dumps(payload, protocol=2))
    assert marker.exists()


async def test_a_model_over_the_cap_is_refused_while_streaming(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir, model_max_bytes=1024 * 1024)) as client:
        before = store_snapshot(data_dir)
        data, files = upload_files(manifest(version="big"), weights_bytes(2))
        request = client.build_request("POST", "/v1/admin/models/upload", data=data, files=files, headers=KEY)
        body = request.read()

        async def no_length() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        response = await client.post("/v1/admin/models/upload", content=no_length(),
                                     headers={**KEY, "content-type": request.headers["content-type"]})
        assert response.status_code == 413 and response.json()["code"] == "too_large", response.text
        assert store_snapshot(data_dir) == before
        assert await read_digit(client) == (1, "v1")


async def test_with_no_key_configured_admin_endpoints_refuse_everything(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir, api_key=None)) as client:
        response = await upload(client, manifest(version="v2"), weights_bytes(2))
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
        assert "HANDWRITING_API_KEY" in response.json()["message"]
        assert (await client.get("/v1/admin/models", headers=KEY)).status_code == 401
        activate = await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v1/activate", headers=KEY)
        assert activate.status_code == 401


async def test_an_empty_key_is_refused_on_every_admin_route_while_a_key_is_configured(
    data_dir: Path, redis_url: str
) -> None:
    install_model(data_dir, "v2", forced_digit=2, activate=False)
    install_model(data_dir, "v1", forced_digit=1)
    settings = make_settings(data_dir).model_copy(update={"redis_url": redis_url})
    empty = {"X-Api-Key": ""}
    async with running_app(settings) as client:
        before = store_snapshot(data_dir)
        responses = {
            "upload": await upload(client, manifest(version="v3"), weights_bytes(3), key=""),
            "list": await client.get("/v1/admin/models", headers=empty),
            "activate": await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v2/activate", headers=empty),
            "train": await client.post("/v1/train", headers=empty, json={"epochs": 1}),
        }
        for route, response in responses.items():
            assert response.status_code == 401, (route, response.text)
            assert response.json()["code"] == "unauthorized" and "X-Api-Key" in response.json()["message"]
            assert "versions" not in response.json()
        assert store_snapshot(data_dir) == before
        assert await read_digit(client) == (1, "v1")
        # The right key on the same routes goes through: the refusals above were the key's.
        assert (await client.get("/v1/admin/models", headers=KEY)).status_code == 200
    queued = redis.Redis.from_url(redis_url)
    assert queued.llen("rq:queue:digits") == 0, "no training was enqueued"
    queued.close()


# --- success, listing, rollback ----------------------------------------------------------------------


async def test_upload_stores_a_version_and_activates_it(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir)) as client:
        response = await upload(client, manifest(version="v2", val_acc=0.99), weights_bytes(2))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body.pop("gate")["decision"] == "forced"  # the helper forces: random models (tests/test_gate.py)
        assert body == {"model_id": MODEL_ID, "version": "v2",
                        "sha256": hashlib.sha256(weights_bytes(2)).hexdigest(), "activated": True}
        assert await read_digit(client) == (2, "v2")
        active = (await client.get("/v1/models/active")).json()
        assert (active["version"], active["val_acc"]) == ("v2", 0.99)
    stored = data_dir / "models" / MODEL_ID / "v2"
    assert (stored / "model.pt").read_bytes() == weights_bytes(2)
    assert json.loads((stored / "manifest.json").read_bytes())["version"] == "v2"
    assert json.loads((data_dir / "models" / "active.json").read_bytes())["version"] == "v2"


async def test_an_upload_without_activation_is_stored_and_can_be_activated_later(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir)) as client:
        response = await upload(client, manifest(version="v2"), weights_bytes(2), activate=False)
        assert response.status_code == 200 and response.json()["activated"] is False
        assert await read_digit(client) == (1, "v1")
        activated = await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v2/activate", headers=KEY)
        assert activated.json() == {"model_id": MODEL_ID, "version": "v2", "activated": True}
        assert await read_digit(client) == (2, "v2")


async def test_the_same_upload_retried_is_accepted_other_weights_under_its_version_are_refused(
    data_dir: Path,
) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir)) as client:
        doc = manifest(version="v2")
        first = await upload(client, doc, weights_bytes(2))
        again = await upload(client, doc, weights_bytes(2))
        assert first.status_code == again.status_code == 200 and first.json() == again.json()
        before = store_snapshot(data_dir)
        clash = await upload(client, doc, weights_bytes(3))
        assert clash.status_code == 409 and clash.json()["code"] == "version_exists"
        assert store_snapshot(data_dir) == before
        assert await read_digit(client) == (2, "v2")


async def test_listing_and_rollback(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir)) as client:
        for digit in (2, 3):
            assert (await upload(client, manifest(version=f"v{digit}"), weights_bytes(digit))).status_code == 200
        listing = (await client.get("/v1/admin/models", headers=KEY)).json()
        assert listing["active"] == {"model_id": MODEL_ID, "version": "v3"}
        assert [(v["version"], v["active"]) for v in listing["versions"]] == [("v3", True), ("v2", False),
                                                                               ("v1", False)]
        assert listing["versions"][1]["manifest"]["weights_sha256"] == hashlib.sha256(weights_bytes(2)).hexdigest()

        rolled = await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v1/activate", headers=KEY)
        assert rolled.status_code == 200, rolled.text
        assert await read_digit(client) == (1, "v1")
        assert (await client.get("/v1/admin/models", headers=KEY)).json()["active"]["version"] == "v1"

        missing = await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v9/activate", headers=KEY)
        assert missing.status_code == 404 and missing.json()["code"] == "not_found"
        assert await read_digit(client) == (1, "v1")


async def test_retention_keeps_the_last_versions_and_the_active_one(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir, keep_versions=2)) as client:
        for digit in (2, 3, 4):
            response = await upload(client, manifest(version=f"v{digit}"), weights_bytes(digit), activate=False)
            assert response.status_code == 200
        versions = [v["version"] for v in (await client.get("/v1/admin/models", headers=KEY)).json()["versions"]]
        assert versions == ["v4", "v3", "v1"]  # v1 stays: it is active
        assert await read_digit(client) == (1, "v1")


async def test_a_stored_version_that_no_longer_loads_is_not_activated(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    install_model(data_dir, "v2", forced_digit=2)
    ModelStore(data_dir / "models").set_active(MODEL_ID, "v1")
    (data_dir / "models" / MODEL_ID / "v2" / "model.pt").write_bytes(b"corrupted on disk")
    async with running_app(make_settings(data_dir)) as client:
        response = await client.post(f"/v1/admin/models/{MODEL_ID}/versions/v2/activate", headers=KEY)
        assert response.status_code == 409 and response.json()["code"] == "invalid_weights"
        assert await read_digit(client) == (1, "v1")
        assert (await client.get("/v1/admin/models", headers=KEY)).json()["active"]["version"] == "v1"


# --- a live server: hot swap under load, restart --------------------------------------------------------


def test_hot_swap_under_load_drops_no_read_and_a_restart_serves_the_same_active_version(
    data_dir: Path, served_app: Callable[..., ServedApp]
) -> None:
    for digit in (3, 4):
        install_model(data_dir, f"v{digit}", forced_digit=digit, activate=False)
    install_model(data_dir, "v0", forced_digit=0)
    settings = {"data_dir": data_dir, "handwriting_api_key": API_KEY,
                "api": {"keep_versions": 20, "read_timeout_s": 30}}
    live = served_app(**settings)
    digit_of = {"v0": 0, "v3": 3, "v4": 4}
    # Ten activations: two uploads of new versions, eight rollbacks to stored ones.
    plan = ["v1", "v3", "v0", "v2", "v4", "v1", "v3", "v2", "v0", "v4"]
    # version -> windows it may have answered in: from its activation being sent to the next one answered
    windows: dict[str, list[tuple[float, float]]] = {"v0": [(0.0, float("inf"))]}
    reads: list[tuple[float, float, int, dict[str, object]]] = []
    stop = threading.Event()

    def reader() -> None:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            while not stop.is_set():
                started = time.monotonic()
                response = client.post("/v1/read", files={"file": ("d.png", PNG, "image/png")})
                reads.append((started, time.monotonic(), response.status_code, response.json()))

    threads = [threading.Thread(target=reader) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=live.url, headers=KEY, timeout=120) as admin:
            previous = "v0"
            for version in plan:
                time.sleep(0.15)
                sent = time.monotonic()
                if version not in digit_of:
                    digit_of[version] = int(version[1:])
                    data, files = upload_files(manifest(version=version), weights_bytes(digit_of[version]))
                    response = admin.post("/v1/admin/models/upload", data=data, files=files)
                else:
                    response = admin.post(f"/v1/admin/models/{MODEL_ID}/versions/{version}/activate")
                assert response.status_code == 200, response.text
                windows[previous][-1] = (windows[previous][-1][0], time.monotonic())
                windows.setdefault(version, []).append((sent, float("inf")))
                previous = version
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert len(reads) >= 16 * 5
    assert [(status, body) for _, _, status, body in reads if status != 200] == []
    seen = set()
    for started, ended, _, body in reads:
        version = str(body["version"])
        seen.add(version)
        assert body["digit"] == digit_of[version], body  # the answer came from the model it names
        assert any(first <= ended and started <= last for first, last in windows[version]), (version, started)
    assert len(seen) >= 4, seen  # the swaps really happened under load

    live.stop()
    again = served_app(**settings)
    assert httpx.get(again.url + "/readyz").json()["version"] == plan[-1]
    response = httpx.post(again.url + "/v1/read", files={"file": ("d.png", PNG, "image/png")}, timeout=30)
    assert (response.json()["digit"], response.json()["version"]) == (digit_of[plan[-1]], plan[-1])


async def test_concurrent_uploads_leave_one_consistent_active_version(data_dir: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    async with running_app(make_settings(data_dir)) as client:
        responses = await asyncio.gather(
            *(upload(client, manifest(version=f"c{d}"), weights_bytes(d)) for d in (2, 3, 4))
        )
        assert all(r.status_code == 200 for r in responses)
        pointer = json.loads((data_dir / "models" / "active.json").read_bytes())["version"]
        served = (await client.get("/v1/models/active")).json()["version"]
        digit, version = await read_digit(client)
        assert pointer == served == version and digit == int(version[1:])
