"""Shared fixtures: a real embedded Redis and a really trained model for the session, a clean database per
test, live processes."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
import redis

from config.settings import Settings
from tests.discord_support import Signer
from tests.fake_discord import FakeDiscord
from tests.support import TEST_GATE_SIZE, ServedApp, serve
from tests.trained_support import MIN_TEST_ACC, TrainedModel, shared_real_model
from worker.cli.redis_embedded import EmbeddedRedis

# The modules that take longest (20-90 s each alone: browsers, real worker processes, replicas, Redis restarts), run
# first. `make test` hands whole modules to its pytest-xdist workers in collection order (--no-loadscope-reorder:
# xdist's own order, most tests first, sent these few-test modules last, and the run waited on them at the end).
SLOW_FIRST: Final = ("test_page.py", "test_faults.py", "test_replication.py", "test_worker_e2e.py",
                     "test_admin_upload.py", "test_archs.py", "test_store_lifecycle.py", "test_job_events.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: the rest as collected


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """A model of the default arch really trained on MNIST (tests/trained_support.py), once per run (the
    pytest-xdist workers share it): for tests that need a model that reads. Its artifacts folder is the
    worker's (model.pt + manifest)."""
    base = tmp_path_factory.getbasetemp()
    model = shared_real_model(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
    assert model.test_acc >= MIN_TEST_ACC, f"the test session's model reached only {model.test_acc:.3f}"
    return model


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    """A real Redis with an empty database for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def served_app() -> Iterator[Callable[..., ServedApp]]:
    """`served_app(**settings)` runs the real app on loopback with those settings (no .env read); each one
    is shut down after the test."""
    started: list[ServedApp] = []

    def start(**values: object) -> ServedApp:
        api = values.pop("api", {})
        assert isinstance(api, dict)
        served = serve(Settings.model_validate({"log_level": "WARNING", **values,
                                                "api": {"gate_size": TEST_GATE_SIZE, **api}}))
        started.append(served)
        return served

    yield start
    for served in started:
        if served.thread.is_alive():
            served.stop()


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; variables from the developer's shell must not leak in."""
    for key in list(os.environ):
        if key.startswith(("REDIS", "RQ__", "DIGITS_", "HANDWRITING_", "DISCORD_", "DATA_DIR", "TRAIN__", "API__")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDiscord]:
    """A fake Discord API and CDN on loopback that records every call (for the Discord tests)."""
    server = FakeDiscord().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def signer() -> Signer:
    """A fresh Ed25519 key pair standing in for the application's (for the Discord tests)."""
    return Signer()
