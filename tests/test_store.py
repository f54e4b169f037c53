"""The model store on disk: immutable versions, an atomic active pointer, bounded retention."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.contracts import WEIGHTS_FILE, ManifestV1_1
from app.store import ModelStore, VersionExistsError, VersionNotFoundError
from tests.serving_support import manifest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def put(store: ModelStore, version: str, weights: bytes = b"weights", *, model_id: str = "m", minute: int = 0) -> None:
    incoming = store.new_incoming()
    (incoming / WEIGHTS_FILE).write_bytes(weights)
    doc = manifest(model_id, version, created_at=(T0 + timedelta(minutes=minute)).isoformat())
    store.commit(incoming, ManifestV1_1.model_validate_json(json.dumps(doc)), hashlib.sha256(weights).hexdigest())


@pytest.fixture
def store(data_dir: Path) -> ModelStore:
    s = ModelStore(data_dir / "models", keep_versions=3)
    s.prepare()
    return s


def test_a_committed_version_holds_its_weights_and_manifest(store: ModelStore) -> None:
    put(store, "v1", b"abc")
    stored = store.get("m", "v1")
    assert stored.weights_path.read_bytes() == b"abc"
    assert stored.manifest.version == "v1"
    assert stored.manifest.weights_sha256 == hashlib.sha256(b"abc").hexdigest()
    assert not any((store.root / ".incoming").iterdir())


def test_versions_are_listed_in_the_order_received_and_uploads_in_progress_are_not_versions(
    store: ModelStore,
) -> None:
    put(store, "b", minute=2)
    put(store, "a", minute=1)  # the uploader's created_at says older: the server received it later
    half = store.new_incoming()
    (half / WEIGHTS_FILE).write_bytes(b"partial")
    assert [v.version for v in store.versions("m")] == ["b", "a"]
    assert [v.version for v in store.versions()] == ["b", "a"]


def test_a_version_is_immutable_but_a_retried_upload_of_it_is_accepted(store: ModelStore) -> None:
    put(store, "v1", b"same")
    put(store, "v1", b"same")  # the uploader retried after a timeout: same version, same bytes
    with pytest.raises(VersionExistsError):
        put(store, "v1", b"other")
    assert store.get("m", "v1").weights_path.read_bytes() == b"same"
    assert not any((store.root / ".incoming").iterdir())


def test_the_active_pointer_survives_a_restart(store: ModelStore) -> None:
    put(store, "v1")
    put(store, "v2", minute=1)
    store.set_active("m", "v1")
    reopened = ModelStore(store.root)
    reopened.prepare()
    active = reopened.active()
    assert active is not None and (active.model_id, active.version) == ("m", "v1")
    assert [p.name for p in store.root.iterdir() if p.name.endswith(".tmp")] == []


def test_activating_a_missing_version_changes_nothing(store: ModelStore) -> None:
    put(store, "v1")
    store.set_active("m", "v1")
    before = (store.root / "active.json").read_bytes()
    for model_id, version in (("m", "nope"), ("other", "v1"), ("m", "../m"), ("..", "v1")):
        with pytest.raises(VersionNotFoundError):
            store.set_active(model_id, version)
    assert (store.root / "active.json").read_bytes() == before


def test_retention_keeps_the_newest_n_and_never_the_active_one(store: ModelStore) -> None:
    for i in range(3):
        put(store, f"v{i}", minute=i)
    store.set_active("m", "v0")
    put(store, "v3", minute=3)
    put(store, "v4", minute=4)
    assert store.prune("m") == ["v1"]
    assert [v.version for v in store.versions("m")] == ["v0", "v2", "v3", "v4"]
    put(store, "other1", model_id="n")  # another model's versions count on their own
    assert store.prune("n") == []
    assert not (store.root / ".trash").exists() or not any((store.root / ".trash").iterdir())


def test_what_a_crash_left_behind_is_cleared_at_start(store: ModelStore) -> None:
    put(store, "v1")
    leftover = store.new_incoming()
    (leftover / WEIGHTS_FILE).write_bytes(b"half an upload")
    ModelStore(store.root).prepare()  # this process's own leftover: cleared
    assert not any((store.root / ".incoming").iterdir())
    assert [v.version for v in store.versions()] == ["v1"]
