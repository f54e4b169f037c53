"""The promotion gate, through the real app: a worse candidate is stored but not served, a better one
goes live, `force=true` overrides, the first model has nothing to beat, the manifest's claims decide
nothing, and /metrics counts the decisions.

The models are real networks whose classifier always answers one digit, so each one's accuracy on the
gate set is exactly the share of that digit among the set's labels: the test knows what the gate must
measure. The set is the real one (seeded MNIST test digits through the real preprocessing), built once
for the module and copied into each test's DATA_DIR, as a running API caches it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.contracts import TrainCompletedV1, dump_event, parse_event
from app.discord.relay import render
from app.gate_set import (
    IN_PROCESS_MAX,
    GateSet,
    GateStoppedError,
    build_gate_set,
    cached_or_built,
    gate_key,
    load_gate_set,
    save_gate_set,
)
from tests.serving_support import (
    API_KEY,
    MODEL_ID,
    digit_png,
    install_model,
    make_settings,
    manifest,
    running_app,
    upload,
    weights_bytes,
)
from tests.support import wait_until
from tests.test_worker_e2e import assert_bot_json_types

pytestmark = pytest.mark.anyio

SIZE = 200
KEY = {"X-Api-Key": API_KEY}
PNG = digit_png()


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def gate_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gate") / f"gate-{gate_key(SIZE)}.npz"
    save_gate_set(path, build_gate_set(SIZE))
    return path


@pytest.fixture
def cached_gate(gate_file: Path, data_dir: Path) -> GateSet:
    """The module's gate set, where the API caches it (DATA_DIR/gate)."""
    (data_dir / "gate").mkdir()
    shutil.copy(gate_file, data_dir / "gate" / gate_file.name)
    gate_set = load_gate_set(gate_file, gate_key(SIZE))
    assert gate_set is not None
    return gate_set


def share(gate_set: GateSet, digit: int) -> float:
    """The accuracy of a model that always answers `digit`."""
    return float(np.mean(gate_set.labels == digit))


@pytest.fixture
async def client(data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(data_dir, gate_size=SIZE)) as c:
        yield c


async def served(client: httpx.AsyncClient) -> tuple[int, str]:
    response = await client.post("/v1/read", files={"file": ("d.png", PNG, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["digit"], response.json()["version"]


async def gate_counts(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    return {m[1]: float(m[2]) for m in re.finditer(r'model_gate_decisions_total\{decision="(\w+)"\} ([0-9.]+)', text)}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


async def test_the_first_model_goes_live_with_nothing_to_beat_and_the_next_gate_is_prepared(
    data_dir: Path, client: httpx.AsyncClient
) -> None:
    before = await gate_counts(client)
    response = await upload(client, manifest(version="v1", val_acc=0.01), weights_bytes(3), force=False)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["activated"] is True
    assert body["gate"]["decision"] == "passed" and "nothing to beat" in body["gate"]["reason"]
    assert await served(client) == (3, "v1")
    # Once a model is served, the gate readies the next decision in the background: it builds its set
    # and scores the served model, so the first candidate waits only for its own measurement.
    score = data_dir / "gate" / gate_key(SIZE) / f"{hashlib.sha256(weights_bytes(3)).hexdigest()}.json"
    await asyncio.to_thread(wait_until, score.exists, 120, "the served model's gate score")
    gate_set = load_gate_set(data_dir / "gate" / f"gate-{gate_key(SIZE)}.npz", gate_key(SIZE))
    assert gate_set is not None and len(gate_set.images) == SIZE
    assert json.loads(score.read_bytes())["accuracy"] == pytest.approx(share(gate_set, 3))
    assert delta(await gate_counts(client), before) == {"passed": 1.0}  # preparing is not a decision


async def test_a_worse_candidate_is_stored_inactive_and_force_activates_it(
    data_dir: Path, cached_gate: GateSet
) -> None:
    worse, better = sorted(range(10), key=lambda d: share(cached_gate, d))[0], 1
    assert share(cached_gate, better) - share(cached_gate, worse) > 0.002  # more than the 0.2-point tolerance
    install_model(data_dir, "v1", forced_digit=better)
    async with running_app(make_settings(data_dir, gate_size=SIZE)) as live:
        before = await gate_counts(live)
        # The manifest claims a far better model: claims decide nothing.
        claim = manifest(version="v2", val_acc=0.999, test_acc=0.999)
        response = await upload(live, claim, weights_bytes(worse), force=False)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["activated"] is False
        gate = body["gate"]
        assert gate["decision"] == "refused"
        assert gate["candidate_acc"] == pytest.approx(share(cached_gate, worse))
        assert gate["active_acc"] == pytest.approx(share(cached_gate, better))
        assert (gate["active_version"], gate["images"], gate["tolerance_points"]) == ("v1", SIZE, 0.2)
        assert "refused" in gate["reason"] and "v1" in gate["reason"]
        assert await served(live) == (better, "v1")
        assert (await live.get("/v1/models/active")).json()["version"] == "v1"
        listing = (await live.get("/v1/admin/models", headers=KEY)).json()
        assert {v["version"]: (v["active"], v["gate"]) for v in listing["versions"]} == {
            "v2": (False, "refused"), "v1": (True, None)}

        # The admin insists: the same upload with force=true serves it.
        forced = await upload(live, claim, weights_bytes(worse), force=True)
        assert forced.status_code == 200, forced.text
        assert (forced.json()["activated"], forced.json()["gate"]["decision"]) == (True, "forced")
        assert await served(live) == (worse, "v2")
        assert delta(await gate_counts(live), before) == {"refused": 1.0, "forced": 1.0}


async def test_a_candidate_at_least_as_good_goes_live_and_the_active_score_is_cached(
    data_dir: Path, cached_gate: GateSet
) -> None:
    order = sorted(range(10), key=lambda d: share(cached_gate, d))
    worst, best = order[0], order[-1]
    install_model(data_dir, "v1", forced_digit=worst)
    async with running_app(make_settings(data_dir, gate_size=SIZE)) as live:
        response = await upload(live, manifest(version="v2", val_acc=0.2), weights_bytes(best), force=False)
        assert response.status_code == 200, response.text
        gate = response.json()["gate"]
        assert (response.json()["activated"], gate["decision"]) == (True, "passed")
        assert gate["candidate_acc"] == pytest.approx(share(cached_gate, best))
        assert await served(live) == (best, "v2")
        # Each version is measured once: its score is kept beside the set, by the weights' sha256.
        scores = sorted(p.name for p in (data_dir / "gate" / gate_key(SIZE)).iterdir())
        assert len(scores) == 2
        # The same weights under a new version: an equal candidate passes, measured from the cache.
        again = await upload(live, manifest(version="v3"), weights_bytes(best), force=False)
        assert again.json()["gate"]["decision"] == "passed" and again.json()["activated"] is True
        assert sorted(p.name for p in (data_dir / "gate" / gate_key(SIZE)).iterdir()) == scores


async def test_the_tolerance_lets_a_slightly_worse_candidate_through(data_dir: Path, cached_gate: GateSet) -> None:
    order = sorted(range(10), key=lambda d: share(cached_gate, d))
    a, b = order[-1], order[-2]  # b is worse than a by a few points at most
    gap = (share(cached_gate, a) - share(cached_gate, b)) * 100
    install_model(data_dir, "v1", forced_digit=a)
    async with running_app(make_settings(data_dir, gate_size=SIZE, gate_tolerance=gap + 0.5)) as live:
        response = await upload(live, manifest(version="v2"), weights_bytes(b), force=False)
        assert response.json()["gate"]["decision"] == "passed", response.text
        assert await served(live) == (b, "v2")


async def test_the_gate_builds_its_set_once_and_rebuilds_a_damaged_cache(data_dir: Path, gate_file: Path) -> None:
    install_model(data_dir, "v1", forced_digit=1)
    damaged = data_dir / "gate" / gate_file.name
    damaged.parent.mkdir()
    raw = bytearray(gate_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the images
    damaged.write_bytes(bytes(raw))
    assert load_gate_set(damaged, gate_key(SIZE)) is None  # the checksum (or the zip's CRC) catches it
    async with running_app(make_settings(data_dir, gate_size=SIZE)) as live:
        response = await upload(live, manifest(version="v2"), weights_bytes(1), force=False)
        assert response.json()["gate"]["images"] == SIZE, response.text
    assert damaged.read_bytes() == gate_file.read_bytes()  # rebuilt, identical: the set is deterministic


def test_a_stop_abandons_a_gate_set_being_built() -> None:
    stop = threading.Event()
    stop.set()  # the API is shutting down
    with pytest.raises(GateStoppedError):
        build_gate_set(60, stop=stop)


def test_a_large_set_is_built_in_its_own_process_identical_and_abandoned_on_shutdown(tmp_path: Path) -> None:
    """Sets over IN_PROCESS_MAX images are built by a child process (the API's GIL stays free for reads) on
    two forked workers; the set is the one the calling thread would build alone, and a shutdown kills the
    child and caches nothing."""
    size = IN_PROCESS_MAX + 40
    path = tmp_path / "gate" / f"gate-{gate_key(size)}.npz"
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)  # the API shuts down while the child is still at work
    timer.start()
    with pytest.raises(GateStoppedError):
        cached_or_built(path, size, workers=2, stop=stop)
    timer.cancel()
    assert not path.exists()
    built = cached_or_built(path, size, workers=2, stop=threading.Event())
    assert path.exists() and len(built.images) == size
    here = build_gate_set(size)
    assert np.array_equal(built.images, here.images) and np.array_equal(built.labels, here.labels)


def test_a_gate_set_whose_content_does_not_match_its_checksum_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 60).astype(np.int64)
    path = tmp_path / "gate.npz"
    save_gate_set(path, GateSet(images, labels, "k"))
    loaded = load_gate_set(path, "k")
    assert loaded is not None and np.array_equal(loaded.images, images)
    tampered = labels.copy()
    tampered[0] = (tampered[0] + 1) % 10
    with np.load(path) as z:
        checksum = z["sha256"]
    buf = tmp_path / "tampered.npz"
    np.savez(buf, images=images, labels=tampered, sha256=checksum)  # a valid zip whose labels were changed
    assert load_gate_set(buf, "k") is None


# --- what the user is told ----------------------------------------------------------------------------


def completed(**gate: object) -> TrainCompletedV1:
    return TrainCompletedV1.model_validate({"request_id": "r1", "user_id": 7, "model_id": MODEL_ID, "job_id": "j1",
                                            "run_id": "run1", "val_acc": 0.91, "test_acc": 0.9, "version": "v9",
                                            **gate})


def test_the_train_reply_says_why_a_model_did_not_go_live_with_both_accuracies() -> None:
    refused = completed(activated=False, gate_decision="refused", gate_candidate_acc=0.931, gate_active_acc=0.994,
                        activation_reason="gate refused: 93.10% on 1000 gate images, worse than ...")
    text = render(refused)
    assert "not activated" in text and "worse than the model in service" in text
    assert "93.10%" in text and "99.40%" in text
    passed = completed(activated=True, gate_decision="passed", gate_candidate_acc=0.995, gate_active_acc=0.994)
    assert "It is now the active model (gate set: 99.50% vs 99.40%" in render(passed)
    assert "force" in render(completed(activated=True, gate_decision="forced"))


def test_the_completed_event_with_the_gate_stays_what_the_gateway_bot_decodes() -> None:
    event = completed(activated=False, gate_decision="refused", gate_candidate_acc=0.5, gate_active_acc=0.9,
                      activation_reason="gate refused")
    message = json.loads(dump_event(event))
    assert_bot_json_types(message)  # the bot's required fields and JSON types, unchanged
    assert parse_event(json.dumps(message)) == event
    # An event from before the gate (no gate fields) still parses.
    legacy = {k: v for k, v in message.items() if not k.startswith(("gate_", "activation_"))}
    old = parse_event(json.dumps(legacy))
    assert isinstance(old, TrainCompletedV1) and old.activated is False and old.gate_decision is None
