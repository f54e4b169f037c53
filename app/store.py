"""The versioned model store on disk, and the pointer to the active version.

Layout under `DATA_DIR/models`:

    <model_id>/<version>/model.pt        the weights (a state dict, loaded with weights_only=True); immutable
    <model_id>/<version>/manifest.json   manifest v1.1 (with the sha256 of the weights); immutable
    <model_id>/<version>/record.json     what the server knows of the version: when it was received, when it
                                         last went live, what the promotion gate said (VersionRecord)
    active.json                          {"model_id": ..., "version": ...}
    .lock                                the cross-process lock (fcntl.flock) around every mutation
    .incoming/<host>_<pid>_<uuid>/       uploads being received; never read as versions
    .trash/                              versions being deleted; never read as versions

A version appears by renaming a complete, fsynced directory into place, and disappears by being
renamed into `.trash` before it is deleted, so a reader sees a whole version or none. The active
pointer and the records are replaced the same way (temp file, fsync, rename). Nothing here knows
about torch: loading and smoke-testing a model is `app.loading`'s.

The public methods, for the admin routes and for anyone installing a version (replication included;
nobody else writes under this root):

- `prepare()` once at start: creates the root, clears stale `.incoming/` entries and `.trash/`.
- `new_incoming()` -> a private directory; write `model.pt` there (fsynced), then `commit()` it, or
  `discard()` it. `commit(incoming, manifest, sha256)` -> (StoredVersion, new?): the version's bytes
  are immutable, so the same version with other weights raises VersionExistsError (across processes).
- `set_active(model_id, version)` points at a stored version and records when it went live;
  `record_gate(model_id, version, verdict)` records the promotion gate's verdict.
- `get`, `versions`, `active`, `record` read; `prune(model_id, protect=...)` applies retention;
  `remove(model_id, version)` deletes one version (never the active one).

Mutations hold `.lock` (fcntl.flock, so every process sharing the directory takes turns) and a thread
lock. A full disk (ENOSPC, EDQUOT, or a file-size limit) raises StorageFullError, with nothing
half-written left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationError

from app.contracts import (
    MANIFEST_FILE,
    MODEL_ID_PATTERN,
    VERSION_PATTERN,
    WEIGHTS_FILE,
    GateDecision,
    ManifestV1_1,
    utc_now,
)
from app.files import fsync_path, write_atomic

ACTIVE_FILE: Final = "active.json"
RECORD_FILE: Final = "record.json"
LOCK_FILE: Final = ".lock"
INCOMING_DIR: Final = ".incoming"
TRASH_DIR: Final = ".trash"
# An upload lives in .incoming for seconds (write, load, gate); one older than this was left by a crash.
INCOMING_STALE_S: Final = 3600.0
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_MODEL_ID = re.compile(MODEL_ID_PATTERN)
_VERSION = re.compile(VERSION_PATTERN)

log = logging.getLogger("app.store")

GateVerdict = GateDecision


class StoreError(Exception):
    pass


class VersionNotFoundError(StoreError):
    pass


class VersionExistsError(StoreError):
    """The version is already stored with different weights (versions are immutable)."""


class StorageFullError(StoreError):
    """The disk (or a quota, or a file-size limit) is full; nothing was changed."""


def is_storage_full(exc: OSError) -> bool:
    return exc.errno in _FULL_ERRNOS


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a full disk while doing `what` into StorageFullError; other OSErrors pass through."""
    try:
        yield
    except OSError as exc:
        if is_storage_full(exc):
            raise StorageFullError(f"no space left to store {what}: {exc.strerror or exc}") from exc
        raise


class VersionRecord(BaseModel):
    """What the server itself knows of a version; never taken from the uploader."""

    model_config = ConfigDict(frozen=True)

    received_at: datetime
    activated_at: datetime | None = None
    gate: GateVerdict | None = None
    gate_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StoredVersion:
    model_id: str
    version: str
    path: Path
    manifest: ManifestV1_1
    record: VersionRecord

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE


@dataclass(frozen=True, slots=True)
class ActivePointer:
    model_id: str
    version: str


def is_safe_model_id(value: str) -> bool:
    return _MODEL_ID.fullmatch(value) is not None


def is_safe_version(value: str) -> bool:
    return _VERSION.fullmatch(value) is not None


def _owner_tag() -> str:
    """This process's prefix for `.incoming` entries: host and pid (a restarted container's API has both)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}_{os.getpid()}_"


class ModelStore:
    """Versions of every model under one root, with bounded retention and an active pointer.

    Methods are synchronous file operations; call them off the event loop.
    """

    def __init__(self, root: Path, keep_versions: int = 5) -> None:
        self.root = root
        self.keep_versions = keep_versions
        self._thread_lock = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One mutation at a time: across threads (RLock) and across processes (flock on `.lock`)."""
        with self._thread_lock:
            if self._depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing the descriptor releases the flock
                    self._lock_fd = None

    def prepare(self) -> None:
        """Create the root and clear what a crash left: `.trash`, and `.incoming` entries that are stale
        (older than INCOMING_STALE_S) or this process's own. Another process's upload in progress stays."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / LOCK_FILE).touch(exist_ok=True)
        own, now = _owner_tag(), time.time()
        for leftover in self._entries(INCOMING_DIR):
            try:
                stale = now - leftover.stat().st_mtime > INCOMING_STALE_S
            except FileNotFoundError:
                continue
            if stale or leftover.name.startswith(own):
                shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self._entries(TRASH_DIR):
            shutil.rmtree(leftover, ignore_errors=True)

    def _entries(self, name: str) -> list[Path]:
        try:
            return list((self.root / name).iterdir())
        except FileNotFoundError:
            return []

    # --- uploads ---------------------------------------------------------------------------------

    def new_incoming(self) -> Path:
        """A fresh private directory for an upload in progress; `discard` or `commit` it."""
        incoming = self.root / INCOMING_DIR
        with storage_errors("an upload"):
            incoming.mkdir(parents=True, exist_ok=True)
            path = incoming / f"{_owner_tag()}{uuid.uuid4().hex}"
            path.mkdir()
        return path

    @staticmethod
    def discard(incoming: Path) -> None:
        shutil.rmtree(incoming, ignore_errors=True)

    def commit(self, incoming: Path, manifest: ManifestV1_1, weights_sha256: str) -> tuple[StoredVersion, bool]:
        """Move a complete upload (`model.pt` already written and fsynced in `incoming`) into place.

        Writes `manifest.json` and the record (received now) beside the weights. Returns the stored
        version and whether it is new; the same version uploaded again with the same weights is the
        same version (a retried upload), with other weights it is refused with VersionExistsError.
        """
        model_dir = self.root / manifest.model_id
        target = model_dir / manifest.version
        with self._locked():
            if target.exists():
                existing = self.get(manifest.model_id, manifest.version)
                self.discard(incoming)
                if existing.manifest.weights_sha256 != weights_sha256:
                    raise VersionExistsError(
                        f"{manifest.model_id} version {manifest.version} is already stored with other weights; "
                        "versions are immutable, give the new one a new version"
                    )
                return existing, False
            stored_manifest = manifest.model_copy(update={"weights_sha256": weights_sha256})
            record = VersionRecord(received_at=utc_now())
            with storage_errors(f"{manifest.model_id} {manifest.version}"):
                write_atomic(incoming / MANIFEST_FILE, stored_manifest.model_dump_json(indent=2).encode("utf-8"))
                write_atomic(incoming / RECORD_FILE, record.model_dump_json(indent=2).encode("utf-8"))
                model_dir.mkdir(exist_ok=True)
                os.rename(incoming, target)
                fsync_path(model_dir)
                fsync_path(self.root)
            return StoredVersion(manifest.model_id, manifest.version, target, stored_manifest, record), True

    # --- reading ---------------------------------------------------------------------------------

    def get(self, model_id: str, version: str) -> StoredVersion:
        if not (is_safe_model_id(model_id) and is_safe_version(version)):
            raise VersionNotFoundError(f"no version {version!r} of model {model_id!r}")
        path = self.root / model_id / version
        try:
            raw = (path / MANIFEST_FILE).read_bytes()
        except FileNotFoundError as exc:
            raise VersionNotFoundError(f"no version {version!r} of model {model_id!r}") from exc
        try:
            manifest = ManifestV1_1.model_validate_json(raw)
        except ValidationError as exc:
            raise StoreError(f"stored manifest of {model_id}/{version} is unreadable: {exc}") from exc
        return StoredVersion(model_id, version, path, manifest, self._read_record(path))

    @staticmethod
    def _read_record(path: Path) -> VersionRecord:
        try:
            return VersionRecord.model_validate_json((path / RECORD_FILE).read_bytes())
        except (OSError, ValidationError):
            # A version stored before records existed (or a damaged record): the server received it no
            # later than its manifest file was written here, whatever the manifest's created_at says.
            try:
                received = datetime.fromtimestamp((path / MANIFEST_FILE).stat().st_mtime, UTC)
            except OSError:
                received = datetime.fromtimestamp(0, UTC)
            return VersionRecord(received_at=received)

    def record(self, model_id: str, version: str) -> VersionRecord:
        return self.get(model_id, version).record

    def versions(self, model_id: str | None = None) -> list[StoredVersion]:
        """Stored versions, oldest first by the time this server received them; unreadable ones are skipped."""
        found: list[StoredVersion] = []
        if not self.root.is_dir():
            return found
        model_dirs = [self.root / model_id] if model_id is not None else sorted(self.root.iterdir())
        for model_dir in model_dirs:
            if not (model_dir.is_dir() and is_safe_model_id(model_dir.name)):
                continue
            for version_dir in sorted(model_dir.iterdir()):
                if not version_dir.is_dir():
                    continue
                try:
                    found.append(self.get(model_dir.name, version_dir.name))
                except StoreError as exc:
                    log.warning("skipping %s: %s", version_dir, exc)
        found.sort(key=lambda v: (v.model_id, v.record.received_at, v.version))
        return found

    # --- the active pointer and the records --------------------------------------------------------

    def active(self) -> ActivePointer | None:
        try:
            raw = json.loads((self.root / ACTIVE_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("active pointer unreadable: %s", exc)
            return None
        model_id = raw.get("model_id") if isinstance(raw, dict) else None
        version = raw.get("version") if isinstance(raw, dict) else None
        if not (isinstance(model_id, str) and isinstance(version, str)):
            log.error("active pointer malformed: %r", raw)
            return None
        return ActivePointer(model_id, version)

    def set_active(self, model_id: str, version: str) -> None:
        """Point at a stored version, and record that it went live now."""
        with self._locked():
            stored = self.get(model_id, version)  # exists, or VersionNotFoundError
            already_live = self.active() == ActivePointer(model_id, version) and stored.record.activated_at
            body = json.dumps({"model_id": model_id, "version": version}).encode("utf-8")
            with storage_errors("the active pointer"):
                write_atomic(self.root / ACTIVE_FILE, body)
            if not already_live:  # activating what is live already does not move when it went live
                self._write_record(stored, stored.record.model_copy(update={"activated_at": utc_now()}))

    def record_gate(self, model_id: str, version: str, verdict: GateVerdict) -> None:
        """Record the promotion gate's verdict on a stored version (retention keeps the last that passed)."""
        with self._locked():
            stored = self.get(model_id, version)
            self._write_record(stored, stored.record.model_copy(update={"gate": verdict, "gate_at": utc_now()}))

    def _write_record(self, stored: StoredVersion, record: VersionRecord) -> None:
        # The record is what the server knows, not the model: on a full disk the old record stays, and the
        # change it describes (already made) stands.
        try:
            write_atomic(stored.path / RECORD_FILE, record.model_dump_json(indent=2).encode("utf-8"))
        except OSError as exc:
            log.error("could not update the record of %s %s: %s", stored.model_id, stored.version, exc)

    # --- retention -------------------------------------------------------------------------------

    def prune(self, model_id: str, *, protect: Collection[str] = ()) -> list[str]:
        """Keep the `keep_versions` versions of `model_id` received last, and whatever their age: the
        active one, the last one that passed the promotion gate, and the versions named in `protect`
        (an upload protects the version it stored)."""
        with self._locked():
            versions = self.versions(model_id)
            keep = set(protect)
            active = self.active()
            if active is not None and active.model_id == model_id:
                keep.add(active.version)
            passed = [v for v in versions if v.record.gate == "passed"]
            if passed:
                keep.add(max(passed, key=lambda v: (v.record.gate_at or v.record.received_at)).version)
            removed: list[str] = []
            for stored in versions[: max(0, len(versions) - self.keep_versions)]:
                if stored.version not in keep:
                    self._delete(stored)
                    removed.append(stored.version)
            if removed:
                log.info("retention removed %d version(s) of %s: %s", len(removed), model_id, ", ".join(removed))
            return removed

    def remove(self, model_id: str, version: str) -> None:
        """Delete one stored version (an upload undoing its own commit); the active one is never removed."""
        with self._locked():
            stored = self.get(model_id, version)
            active = self.active()
            if active is not None and (active.model_id, active.version) == (model_id, version):
                raise StoreError(f"{model_id} {version} is active; activate another version first")
            self._delete(stored)

    def _delete(self, stored: StoredVersion) -> None:
        trash = self.root / TRASH_DIR
        trash.mkdir(exist_ok=True)
        gone = trash / uuid.uuid4().hex
        os.rename(stored.path, gone)
        shutil.rmtree(gone, ignore_errors=True)
